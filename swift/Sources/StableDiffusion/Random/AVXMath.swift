/// Cephes-style float log and sincos in the exact operation order of the AVX2 kernel PyTorch's x86
/// wheels use for `randn`, so those samples can be reproduced bit for bit anywhere. The wheels are
/// compiled with FMA contraction: every multiply whose only use is an add became a fused
/// multiply-add, which `addingProduct` reproduces (found by matching torch output on 24,000 samples).
enum AVXMath {
    private static let sqrtHalf: Float = 0.707106781186547524
    private static let logCoefficients: [Float] = [
        7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1, 1.4249322787E-1,
        -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1, 3.3333331174E-1,
    ]
    private static let logQ1: Float = -2.12194440e-4
    private static let logQ2: Float = 0.693359375

    static func log(_ input: Float) -> Float {
        if input <= 0 { return .nan }
        let clamped = max(input, Float(bitPattern: 0x0080_0000))
        let bits = clamped.bitPattern
        var e = Float(Int32(bitPattern: bits >> 23) - 0x7F) + 1
        var x = Float(bitPattern: (bits & ~0x7F80_0000) | Float(0.5).bitPattern)
        let below = x < sqrtHalf
        let extra: Float = below ? x : 0
        x = x - 1
        e = e - (below ? 1 : 0)
        x = x + extra
        let z = x * x
        var y = logCoefficients[0]
        for c in logCoefficients.dropFirst() { y = c.addingProduct(y, x) }
        y = (e * logQ1).addingProduct(y * x, z)
        y = y - z * 0.5
        return (x + y).addingProduct(e, logQ2)
    }

    private static let fourOverPi: Float = 1.27323954473516
    private static let dp1: Float = -0.78515625
    private static let dp2: Float = -2.4187564849853515625e-4
    private static let dp3: Float = -3.77489497744594108e-8
    private static let cosCoefficients: [Float] = [2.443315711809948E-005, -1.388731625493765E-003, 4.166664568298827E-002]
    private static let sinCoefficients: [Float] = [-1.9515295891E-4, 8.3321608736E-3, -1.6666654611E-1]

    static func sincos(_ input: Float) -> (sin: Float, cos: Float) {
        let sinSign = input.sign == .minus
        var x = abs(input)
        let j = (Int32(x * fourOverPi) + 1) & ~1
        let y = Float(j)
        let swapSin = j & 4 != 0
        let useSinPolynomial = j & 2 == 0
        x = x.addingProduct(y, dp1)
        x = x.addingProduct(y, dp2)
        x = x.addingProduct(y, dp3)
        let cosNegative = ~(j - 2) & 4 != 0
        let z = x * x
        var c = cosCoefficients[1].addingProduct(cosCoefficients[0], z)
        c = cosCoefficients[2].addingProduct(c, z)
        c = (-(z * 0.5)).addingProduct(c * z, z) + 1
        var s = sinCoefficients[1].addingProduct(sinCoefficients[0], z)
        s = sinCoefficients[2].addingProduct(s, z)
        s = x.addingProduct(s * z, x)
        let sine = useSinPolynomial ? s : c
        let cosine = useSinPolynomial ? c : s
        return (sinSign != swapSin ? -sine : sine, cosNegative ? -cosine : cosine)
    }
}
