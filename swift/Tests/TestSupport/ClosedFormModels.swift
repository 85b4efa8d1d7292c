import Foundation
import StableDiffusion

/// Deterministic stand-ins for the models, the same formulas as
/// `python_coreml_sd/testing/closed_form.py`, so the whole loop runs without weights or Core ML and
/// both languages can be compared. Scalars are computed in Double and rounded once; tensors are Float.
public enum ClosedForm {
    public static let hiddenSize = 8

    public static func models(unsafeAbove threshold: Double = 0.9) -> PipelineModels {
        PipelineModels(textEncoder: TextEncoder(), unet: Denoiser(), decoder: Decoder(), encoder: Encoder(),
                       safetyChecker: SafetyChecker(threshold: threshold))
    }

    public struct TextEncoder: TextEncoding {
        public init() {}

        public func encode(tokenIds: [Int]) throws -> Tensor {
            var scalars: [Float] = []
            for (i, token) in tokenIds.enumerated() {
                for j in 0..<hiddenSize {
                    scalars.append(Float(sin(0.001 * Double(token) * Double(j + 1) + 0.1 * Double(i))))
                }
            }
            return Tensor(shape: [1, tokenIds.count, hiddenSize], scalars: scalars)
        }
    }

    /// 0.1 * sample + (0.01 cos(t / 100) + 0.05 (c + 1) mean(text)) per channel c.
    public struct Denoiser: NoisePredicting {
        public init() {}

        public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor) throws -> Tensor {
            let items = (0..<latents.shape[0]).map { b in
                denoise(latents.batchItem(b), timestep: timestep, mean: mean(hiddenStates.batchItem(b)))
            }
            return Tensor.concatenateBatch(items)
        }

        func mean(_ hidden: Tensor) -> Double {
            hidden.scalars.reduce(0.0) { $0 + Double($1) } / Double(hidden.count)
        }

        func denoise(_ sample: Tensor, timestep: Double, mean: Double) -> Tensor {
            let plane = sample.count / sample.shape[1]
            var out = sample.scalars
            for c in 0..<sample.shape[1] {
                let bias = Float(0.01 * cos(Double(timestep) / 100.0) + 0.05 * Double(c + 1) * mean)
                for i in (c * plane)..<((c + 1) * plane) { out[i] = Float(0.1) * out[i] + bias }
            }
            return Tensor(shape: sample.shape, scalars: out)
        }
    }

    /// tanh(0.02 z) of the first three channels, each latent pixel repeated 8 x 8.
    public struct Decoder: LatentDecoding {
        public init() {}

        public func decode(_ latents: Tensor) throws -> Tensor {
            let h = latents.shape[2], w = latents.shape[3]
            var scalars = [Float](repeating: 0, count: 3 * 64 * h * w)
            for c in 0..<3 {
                for y in 0..<(8 * h) {
                    for x in 0..<(8 * w) {
                        let z = latents.scalars[(c * h + y / 8) * w + x / 8]
                        scalars[(c * 8 * h + y) * 8 * w + x] = Float(tanh(Double(z) * 0.02))
                    }
                }
            }
            return Tensor(shape: [1, 3, 8 * h, 8 * w], scalars: scalars)
        }
    }

    /// Moments (1, 8, h, w): mean = the top-left pixel of each 8 x 8 block per channel plus their
    /// channel mean (unscaled), log-variance = mean - 5 (closed_form.encode_image).
    public struct Encoder: ImageEncoding {
        public init() {}

        public func encode(image: Tensor) throws -> Tensor {
            let height = image.shape[2], width = image.shape[3]
            let h = height / 8, w = width / 8
            var scalars = [Float](repeating: 0, count: 8 * h * w)
            for y in 0..<h {
                for x in 0..<w {
                    let pixels = (0..<3).map { image.scalars[($0 * height + 8 * y) * width + 8 * x] }
                    let fourth = Float(pixels.reduce(0.0) { $0 + Double($1) } / 3)
                    for (c, value) in (pixels + [fourth]).enumerated() {
                        scalars[(c * h + y) * w + x] = value
                        scalars[((c + 4) * h + y) * w + x] = value - 5
                    }
                }
            }
            return Tensor(shape: [1, 8, h, w], scalars: scalars)
        }
    }

    /// Flags images whose mean brightness exceeds the threshold.
    public struct SafetyChecker: SafetyChecking {
        public let threshold: Double

        public init(threshold: Double) { self.threshold = threshold }

        public func isUnsafe(image: Tensor) throws -> Bool {
            image.scalars.reduce(0.0) { $0 + Double($1) } / Double(image.count) > threshold
        }
    }

    /// The deterministic img2img start image: 8-bit, then (1, 3, H, W) in [-1, 1] the way the
    /// pipelines preprocess images (x / 127.5 - 1).
    public static func testImage(height: Int, width: Int) -> Tensor {
        testImageBytes(height: height, width: width).tensor()
    }

    /// closed_form.test_image_bytes: the 8-bit test image itself.
    public static func testImageBytes(height: Int, width: Int) -> RGBImage {
        var bytes: [UInt8] = []
        for y in 0..<height {
            for x in 0..<width {
                for c in 0..<3 {
                    let value = sin(0.05 * Double(x) + 0.3 * Double(c)) * cos(0.07 * Double(y))
                    bytes.append(UInt8(((value + 1) * 127.5).rounded(.toNearestOrEven)))
                }
            }
        }
        return RGBImage(width: width, height: height, bytes: bytes)
    }
}

/// The SDXL stand-ins of `closed_form.py` (XL_WIDTHS, XL_PHASES, XL_POOLED, XL_GAINS, encode_text_xl,
/// pooled_xl, denoise_xl): two text encoders of their own widths and phases, the pooled embedding, and UNets
/// taking the added conditions.
public enum ClosedFormXL {
    public static let widths = [8, 12]
    public static let phases = [0.0, 0.5]
    public static let pooledSize = 4
    public static let baseGain = 0.1
    public static let refinerGain = 0.12

    public static func models(refiner: Bool = true, encoder: Bool = true) -> XLPipelineModels {
        XLPipelineModels(textEncoder: TextEncoder(width: widths[0], phase: phases[0]),
                         textEncoder2: TextEncoder(width: widths[1], phase: phases[1]), unet: Denoiser(gain: baseGain),
                         refiner: refiner ? Denoiser(gain: refinerGain) : nil, decoder: ClosedForm.Decoder(),
                         encoder: encoder ? ClosedForm.Encoder() : nil)
    }

    /// sin(0.001 token (j + 1) + 0.1 i + phase); pooled: cos(1e-5 sum(ids) (j + 1)).
    public struct TextEncoder: XLTextEncoding {
        public let width: Int
        public let phase: Double

        public init(width: Int, phase: Double) {
            self.width = width
            self.phase = phase
        }

        public func encodeXL(tokenIds: [Int]) throws -> (hidden: Tensor, pooled: Tensor) {
            var scalars: [Float] = []
            for (i, token) in tokenIds.enumerated() {
                for j in 0..<width {
                    scalars.append(Float(sin(0.001 * Double(token) * Double(j + 1) + 0.1 * Double(i) + phase)))
                }
            }
            let total = Double(tokenIds.reduce(0, +))
            let pooled = (0..<pooledSize).map { Float(cos(1e-5 * total * Double($0 + 1))) }
            return (Tensor(shape: [1, tokenIds.count, width], scalars: scalars), Tensor(shape: [1, pooledSize], scalars: pooled))
        }
    }

    /// gain * sample + (0.01 cos(t / 100) + 0.05 (c + 1) mean(text) + (c + 1) (1e-4 sum_k (k + 1) id_k
    /// + 0.02 mean(text_embeds))) per channel c.
    public struct Denoiser: ConditionedNoisePredicting {
        public let gain: Double

        public init(gain: Double) { self.gain = gain }

        public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions) throws -> Tensor {
            let items = (0..<latents.shape[0]).map { b -> Tensor in
                let sample = latents.batchItem(b)
                let mean = Self.mean(hiddenStates.batchItem(b))
                let ids = added.timeIds.batchItem(b).scalars
                let positional = ids.enumerated().reduce(0.0) { $0 + Double($1.offset + 1) * Double($1.element) }
                let extra = 1e-4 * positional + 0.02 * Self.mean(added.textEmbeds.batchItem(b))
                let plane = sample.count / sample.shape[1]
                var out = sample.scalars
                for c in 0..<sample.shape[1] {
                    let bias = Float(0.01 * cos(timestep / 100.0) + 0.05 * Double(c + 1) * mean + Double(c + 1) * extra)
                    for i in (c * plane)..<((c + 1) * plane) { out[i] = Float(gain) * out[i] + bias }
                }
                return Tensor(shape: sample.shape, scalars: out)
            }
            return Tensor.concatenateBatch(items)
        }

        static func mean(_ tensor: Tensor) -> Double {
            tensor.scalars.reduce(0.0) { $0 + Double($1) } / Double(tensor.count)
        }
    }
}

/// The ControlNet and inpainting stand-ins of `closed_form.py` (control_residuals, controlled_denoise,
/// inpaint_denoise): a ControlNet of one gain answering two residuals, the controlled UNet adding them to the
/// Denoiser's output, and a 9-channel UNet reading the mask and the masked image's latents.
public enum ClosedFormControl {
    /// residual 0 (B, C, h, w): gain sample + 0.01 cond[c mod 3] at each 8 x 8 block's top-left pixel;
    /// residual 1 (B, C, 1, 1): gain mean(cond) + 0.001 cos(t / 100) + 0.02 mean(text) per channel.
    public struct ControlNet: ControlNetting {
        public let gain: Float

        public init(gain: Float) { self.gain = gain }

        public func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, condition: Tensor) throws -> [Tensor] {
            let (batch, channels, h, w) = (latents.shape[0], latents.shape[1], latents.shape[2], latents.shape[3])
            let (height, width) = (condition.shape[2], condition.shape[3])
            var first = latents.scalars, second: [Float] = []
            for b in 0..<batch {
                let cond = condition.batchItem(b).scalars
                let mean = Float(cond.reduce(0.0) { $0 + Double($1) } / Double(cond.count))
                let text = hiddenStates.batchItem(b).scalars.reduce(0.0) { $0 + Double($1) } / Double(hiddenStates.count / batch)
                for c in 0..<channels {
                    for y in 0..<h {
                        for x in 0..<w {
                            let i = ((b * channels + c) * h + y) * w + x
                            first[i] = gain * first[i] + Float(0.01) * cond[((c % 3) * height + 8 * y) * width + 8 * x]
                        }
                    }
                    second.append(gain * mean + Float(0.001 * cos(timestep / 100) + 0.02 * text))
                }
            }
            return [Tensor(shape: latents.shape, scalars: first), Tensor(shape: [batch, channels, 1, 1], scalars: second)]
        }
    }

    /// The Denoiser's output + 0.5 residual 0 + 0.1 residual 1 (per channel).
    public struct ControlledUnet: ControlledNoisePredicting {
        public init() {}

        public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, residuals: [Tensor]) throws -> Tensor {
            let out = try ClosedForm.Denoiser().predictNoise(latents: latents, timestep: timestep, hiddenStates: hiddenStates)
            let plane = latents.shape[2] * latents.shape[3]
            return Tensor(shape: out.shape, scalars: out.scalars.enumerated().map { i, value in
                value + Float(0.5) * residuals[0].scalars[i] + Float(0.1) * residuals[1].scalars[i / plane]
            })
        }
    }

    /// A 9-channel UNet: the Denoiser on the first 4 channels, + 0.1 mask + 0.05 masked-image latents (channel c).
    public struct InpaintUnet: NoisePredicting {
        public init() {}

        public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor) throws -> Tensor {
            let (batch, h, w) = (latents.shape[0], latents.shape[2], latents.shape[3])
            let plane = h * w
            let items = try (0..<batch).map { b -> Tensor in
                let item = latents.batchItem(b).scalars
                let sample = Tensor(shape: [1, 4, h, w], scalars: Array(item[0..<(4 * plane)]))
                let out = try ClosedForm.Denoiser().predictNoise(latents: sample, timestep: timestep,
                                                                 hiddenStates: hiddenStates.batchItem(b))
                return Tensor(shape: out.shape, scalars: out.scalars.enumerated().map { i, value in
                    value + Float(0.1) * item[4 * plane + i % plane] + Float(0.05) * item[5 * plane + i]
                })
            }
            return Tensor.concatenateBatch(items)
        }
    }
}

/// The SDXL ControlNet and inpainting stand-ins of scripts/make_control_vectors.py (xl_control_model_set): the
/// ClosedFormControl formulas with the added conditions, as ClosedFormXL.Denoiser reads them, in both the ControlNet's
/// constant residual and the base UNet's output.
public enum ClosedFormXLControl {
    /// 1e-4 sum_k (k + 1) time_id_k + 0.02 mean(text_embeds) of batch item `b` (ClosedFormXL.Denoiser's).
    static func extra(_ added: AddedConditions, _ b: Int) -> Double {
        let ids = added.timeIds.batchItem(b).scalars
        let positional = ids.enumerated().reduce(0.0) { $0 + Double($1.offset + 1) * Double($1.element) }
        return 1e-4 * positional + 0.02 * ClosedFormXL.Denoiser.mean(added.textEmbeds.batchItem(b))
    }

    /// ClosedFormControl.ControlNet's residuals, + Float(extra) on residual 1 (float32, after the rest).
    public struct ControlNet: ConditionedControlNetting {
        public let gain: Float

        public init(gain: Float) { self.gain = gain }

        public func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                              condition: Tensor) throws -> [Tensor] {
            var out = try ClosedFormControl.ControlNet(gain: gain).residuals(latents: latents, timestep: timestep,
                                                                           hiddenStates: hiddenStates, condition: condition)
            let channels = latents.shape[1]
            out[1] = Tensor(shape: out[1].shape, scalars: out[1].scalars.enumerated().map { i, value in
                value + Float(extra(added, i / channels))
            })
            return out
        }
    }

    /// The base ClosedFormXL.Denoiser's output + 0.5 residual 0 + 0.1 residual 1 (per channel).
    public struct ControlledUnet: ConditionedControlledNoisePredicting {
        public init() {}

        public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                                 residuals: [Tensor]) throws -> Tensor {
            let out = try ClosedFormXL.Denoiser(gain: ClosedFormXL.baseGain).predictNoise(
                latents: latents, timestep: timestep, hiddenStates: hiddenStates, added: added)
            let plane = latents.shape[2] * latents.shape[3]
            return Tensor(shape: out.shape, scalars: out.scalars.enumerated().map { i, value in
                value + Float(0.5) * residuals[0].scalars[i] + Float(0.1) * residuals[1].scalars[i / plane]
            })
        }
    }
}

extension ClosedFormXLControl {
    /// A 9-channel SDXL base UNet: ClosedFormXL.Denoiser (base gain) on the first 4 channels, + 0.1 mask + 0.05
    /// masked-image latents (channel c), as ClosedFormControl.InpaintUnet.
    public struct InpaintUnet: ConditionedNoisePredicting {
        public init() {}

        public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions) throws -> Tensor {
            let (batch, h, w) = (latents.shape[0], latents.shape[2], latents.shape[3])
            let plane = h * w
            let items = try (0..<batch).map { b -> Tensor in
                let item = latents.batchItem(b).scalars
                let sample = Tensor(shape: [1, 4, h, w], scalars: Array(item[0..<(4 * plane)]))
                let out = try ClosedFormXL.Denoiser(gain: ClosedFormXL.baseGain).predictNoise(
                    latents: sample, timestep: timestep, hiddenStates: hiddenStates.batchItem(b), added: added.batchItem(b))
                return Tensor(shape: out.shape, scalars: out.scalars.enumerated().map { i, value in
                    value + Float(0.1) * item[4 * plane + i % plane] + Float(0.05) * item[5 * plane + i]
                })
            }
            return Tensor.concatenateBatch(items)
        }
    }
}
