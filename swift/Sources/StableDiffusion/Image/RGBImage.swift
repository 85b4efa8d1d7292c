/// An 8-bit RGB image, rows top to bottom, pixels interleaved.
public struct RGBImage: Equatable, Sendable {
    public let width: Int
    public let height: Int
    public var bytes: [UInt8]

    public init(width: Int, height: Int, bytes: [UInt8]) {
        precondition(bytes.count == width * height * 3, "expected \(width * height * 3) bytes, got \(bytes.count)")
        self.width = width
        self.height = height
        self.bytes = bytes
    }

    /// From decoder output (1, 3, H, W) in [-1, 1], as diffusers post-processes:
    /// clamp(x / 2 + 0.5, 0, 1) * 255, rounded half to even.
    public init(decoderOutput image: Tensor) {
        precondition(image.shape.count == 4 && image.shape[1] == 3, "expected (1, 3, H, W), got \(image.shape)")
        let height = image.shape[2], width = image.shape[3]
        let plane = height * width
        var bytes = [UInt8](repeating: 0, count: plane * 3)
        for channel in 0..<3 {
            for pixel in 0..<plane {
                bytes[pixel * 3 + channel] = Self.toByte(image.scalars[channel * plane + pixel])
            }
        }
        self.init(width: width, height: height, bytes: bytes)
    }

    static func toByte(_ value: Float) -> UInt8 {
        let unit = min(max(value / 2 + 0.5, 0), 1)
        return UInt8((unit * 255).rounded(.toNearestOrEven))
    }

    /// (1, 3, H, W) in [-1, 1]: what the VAE encoder takes for img2img.
    public func tensor() -> Tensor { planes { $0 / 127.5 - 1 } }

    /// (1, 3, H, W) in [0, 1]: a ControlNet's condition image, as diffusers preprocesses control images.
    public func unitTensor() -> Tensor { planes { $0 / 255 } }

    private func planes(_ convert: (Float) -> Float) -> Tensor {
        let plane = width * height
        var scalars = [Float](repeating: 0, count: plane * 3)
        for pixel in 0..<plane {
            for channel in 0..<3 {
                scalars[channel * plane + pixel] = convert(Float(bytes[pixel * 3 + channel]))
            }
        }
        return Tensor(shape: [1, 3, height, width], scalars: scalars)
    }
}
