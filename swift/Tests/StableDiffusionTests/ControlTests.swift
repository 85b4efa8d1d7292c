import XCTest
@testable import StableDiffusion
import StableDiffusionTestSupport

/// Records the residuals the controlled UNet receives and answers zeros.
final class RecordingControlledUnet: ControlledNoisePredicting {
    var residuals: [[Tensor]] = []

    func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, residuals: [Tensor]) throws -> Tensor {
        self.residuals.append(residuals)
        return Tensor(zeros: latents.shape)
    }
}

/// Answers fixed residuals, recording the condition it is given.
final class FixedControlNet: ControlNetting {
    let values: [Tensor]
    var conditions: [Tensor] = []

    init(_ values: [Tensor]) { self.values = values }

    func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, condition: Tensor) throws -> [Tensor] {
        conditions.append(condition)
        return values
    }
}

/// Records the UNet's sample.
final class RecordingSampleUnet: NoisePredicting {
    var samples: [Tensor] = []

    func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor) throws -> Tensor {
        samples.append(latents)
        return Tensor(zeros: [latents.shape[0], 4] + latents.shape[2...])
    }
}

final class ControlTests: XCTestCase {
    private func config(steps: Int = 2) -> GenerationConfig {
        var config = GenerationConfig(prompt: "a cat")
        config.stepCount = steps
        config.scheduler = .ddim
        config.latentShape = [1, 4, 2, 2]
        return config
    }

    private func pipeline(unet: NoisePredicting = ClosedForm.Denoiser(), nets: [ControlNetting] = [],
                          controlled: ControlledNoisePredicting? = nil) -> StableDiffusionPipeline {
        StableDiffusionPipeline(tokenizer: Golden.tokenizer, models: PipelineModels(
            textEncoder: ClosedForm.TextEncoder(), unet: unet, decoder: ClosedForm.Decoder(), encoder: ClosedForm.Encoder(),
            controlNets: nets, controlledUnet: controlled))
    }

    /// The SDXL closed-form models of scripts/make_control_vectors.py (xl_control_model_set).
    private func xlPipeline(gains: [Float], inpaint: Bool = false) throws -> StableDiffusionXLPipeline {
        var models = ClosedFormXL.models(refiner: false)
        if inpaint { models.unet = ClosedFormXLControl.InpaintUnet() }
        models.controlNets = gains.map { ClosedFormXLControl.ControlNet(gain: $0) }
        models.controlledUnet = gains.isEmpty ? nil : ClosedFormXLControl.ControlledUnet()
        return StableDiffusionXLPipeline(tokenizer: Golden.tokenizer, tokenizer2: try SDXLTests.tokenizer2(), models: models)
    }

    /// SDXL's ControlNets get the base UNet's added conditions (time ids, pooled embeds) with the batch, and the
    /// controlled UNet the residuals scaled and summed; counts and a missing controlled UNet are refused as SD's.
    func testXLControlNetsGetTheAddedConditions() throws {
        final class Recording: ConditionedControlNetting, ConditionedControlledNoisePredicting {
            var added: [AddedConditions] = [], residuals: [[Tensor]] = []
            func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                           condition: Tensor) throws -> [Tensor] {
                self.added.append(added)
                return [Tensor(shape: [1, 1], scalars: [2])]
            }
            func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                              residuals: [Tensor]) throws -> Tensor {
                self.residuals.append(residuals)
                return Tensor(zeros: latents.shape)
            }
        }
        let recording = Recording()
        var models = ClosedFormXL.models(refiner: false)
        models.controlNets = [recording, recording]
        models.controlledUnet = recording
        let pipe = StableDiffusionXLPipeline(tokenizer: Golden.tokenizer, tokenizer2: try SDXLTests.tokenizer2(), models: models)
        var config = config()
        config.originalSize = [96, 64]
        config.controlInputs = [Tensor(zeros: [1, 3, 16, 16]), Tensor(zeros: [1, 3, 16, 16])]
        config.controlScales = [0.5, 1.5]
        _ = try pipe.generate(config)
        let conditioning = try pipe.baseConditioning(config, encodings: try pipe.encodePair(config))
        XCTAssertEqual(recording.added.count, 4)
        XCTAssertEqual(recording.added.first, conditioning.added)
        XCTAssertEqual(recording.added.first?.timeIds.scalars.prefix(2), [96, 64])
        XCTAssertEqual(recording.residuals, Array(repeating: [Tensor(shape: [1, 1], scalars: [4])], count: 2))
        config.controlInputs.removeLast()
        XCTAssertThrowsError(try pipe.generate(config)) { XCTAssertTrue("\($0)".hasPrefix("2 ControlNets, 1 --controlnet-inputs")) }
        models.controlledUnet = nil
        config.controlInputs += config.controlInputs
        let uncontrolled = StableDiffusionXLPipeline(tokenizer: Golden.tokenizer, tokenizer2: try SDXLTests.tokenizer2(),
                                                     models: models)
        XCTAssertThrowsError(try uncontrolled.generate(config)) {
            XCTAssertEqual("\($0)", PipelineError.missingControlledUnet.description)
        }
    }

    /// SDXL inpainting: a mask needs the start image, and the refiner is refused with it (as the Python pipeline).
    func testXLMaskErrors() throws {
        let pipe = try xlPipeline(gains: [], inpaint: true)
        var config = config()
        config.mask = Tensor(zeros: [1, 1, 16, 16])
        XCTAssertThrowsError(try pipe.generate(config)) { XCTAssertEqual("\($0)", PipelineError.maskWithoutImage.description) }
        config.startImage = Tensor(zeros: [1, 3, 16, 16])
        config.refinerStart = 0.5
        XCTAssertThrowsError(try pipe.generate(config)) { XCTAssertEqual("\($0)", PipelineError.maskWithRefiner.description) }
    }

    /// The inpaint ControlNet's condition: the image in [0, 1], pixels of grey mask above 0.5 at -1.
    func testInpaintControlCondition() {
        let image = Tensor(shape: [1, 3, 1, 2], scalars: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        XCTAssertEqual(StableDiffusionPipeline.inpaintControlCondition(image: image, mask: Tensor(shape: [1, 1, 1, 2], scalars: [0.5, 0.51])).scalars,
                       [0.1, -1, 0.3, -1, 0.5, -1])
    }

    /// The ControlNet inpaint route: after each step the latents outside the mask are the image's latents noised to
    /// the next timestep with the start's noise, after the last step the image's latents themselves.
    func testMaskBlendKeepsTheImageOutsideTheMask() throws {
        let nets = [ClosedFormControl.ControlNet(gain: 0.5)]
        var config = config(steps: 3)
        config.strength = 1
        config.startImage = Tensor(shape: [1, 3, 16, 16], scalars: (0..<768).map { Float($0 % 7) / 7 })
        config.mask = Tensor(shape: [1, 1, 16, 16], scalars: (0..<256).map { $0 % 16 < 8 ? 0 : 1 })
        config.controlInputs = [Tensor(zeros: [1, 3, 16, 16])]
        let result = try XCTUnwrap(try pipeline(nets: nets, controlled: ClosedFormControl.ControlledUnet()).generate(config).first)
        var random = config.rng.makeSource(seed: config.seed)
        _ = random.normalTensor(shape: config.latentShape)
        let moments = try ClosedForm.Encoder().encode(image: config.startImage!)
        let image = try StableDiffusionPipeline.samplePosterior(moments: moments, noise: random.normalTensor(shape: config.latentShape))
        for i in 0..<16 {  // left column of each 2x2 channel plane kept
            if i % 2 == 0 { XCTAssertEqual(result.latents.scalars[i], image.scalars[i] * StableDiffusionPipeline.defaultLatentScale) }
        }
        XCTAssertNotEqual(result.latents.scalars[1], image.scalars[1] * StableDiffusionPipeline.defaultLatentScale)
    }

    /// The loaded models' inputs: the UNet must take residuals, and each ControlNet be of the bundle's family.
    func testControlInputsOfTheModels() throws {
        let sd: Set = ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
        let xl = sd.union(["time_ids", "text_embeds"])
        let controlled: Set = ["sample", "additional_residual_0", "additional_residual_1"]
        XCTAssertNoThrow(try ResourceFolder.checkControlInputs(unetInputs: controlled, controlNetInputs: [("Canny", sd)], family: .sd))
        XCTAssertNoThrow(try ResourceFolder.checkControlInputs(unetInputs: controlled, controlNetInputs: [("Canny", xl)], family: .sdxl))
        XCTAssertNoThrow(try ResourceFolder.checkControlInputs(unetInputs: ["sample"], controlNetInputs: [], family: .sd))
        XCTAssertThrowsError(try ResourceFolder.checkControlInputs(unetInputs: ["sample"], controlNetInputs: [("Canny", sd)],
                                                                   family: .sd)) {
            XCTAssertTrue("\($0)".hasPrefix("a ControlNet was given but this bundle's UNet takes no ControlNet residuals"), "\($0)")
        }
        XCTAssertThrowsError(try ResourceFolder.checkControlInputs(unetInputs: controlled, controlNetInputs: [("Canny", sd)],
                                                                   family: .sdxl)) {
            XCTAssertEqual("\($0)", "--controlnet Canny is SD's (it lacks time_ids) and this is an SDXL bundle; convert a "
                           + "ControlNet of the bundle's model")
        }
        XCTAssertThrowsError(try ResourceFolder.checkControlInputs(unetInputs: controlled, controlNetInputs: [("Depth", xl)],
                                                                   family: .sd)) {
            XCTAssertEqual("\($0)", "--controlnet Depth is SDXL's (it takes time_ids) and this is an SD bundle; convert a "
                           + "ControlNet of the bundle's model")
        }
    }

    func testResidualsScaledAndSummedPerControlNet() {
        let a = [Tensor(shape: [1, 2], scalars: [1, 2]), Tensor(shape: [1, 1], scalars: [3])]
        let b = [Tensor(shape: [1, 2], scalars: [10, 20]), Tensor(shape: [1, 1], scalars: [30])]
        XCTAssertEqual(StableDiffusionPipeline.combineResiduals([a, b], scales: [0.5, 2]),
                       [Tensor(shape: [1, 2], scalars: [20.5, 41]), Tensor(shape: [1, 1], scalars: [61.5])])
        XCTAssertEqual(StableDiffusionPipeline.combineResiduals([a, b], scales: [2]),
                       [Tensor(shape: [1, 2], scalars: [22, 44]), Tensor(shape: [1, 1], scalars: [66])])
    }

    func testEachControlNetGetsItsImageTwiceAndTheUnetTheSum() throws {
        let nets = [FixedControlNet([Tensor(shape: [1, 1], scalars: [1])]), FixedControlNet([Tensor(shape: [1, 1], scalars: [4])])]
        let controlled = RecordingControlledUnet()
        var config = config()
        config.controlInputs = [Tensor(shape: [1, 3, 1, 1], scalars: [0.1, 0.2, 0.3]), Tensor(zeros: [1, 3, 1, 1])]
        config.controlScales = [2, 0.25]
        _ = try pipeline(nets: nets, controlled: controlled).generate(config)
        XCTAssertEqual(nets[0].conditions.first, Tensor(shape: [2, 3, 1, 1], scalars: [0.1, 0.2, 0.3, 0.1, 0.2, 0.3]))
        XCTAssertEqual(nets[1].conditions.count, 2)
        XCTAssertEqual(controlled.residuals, [[Tensor(shape: [1, 1], scalars: [3])], [Tensor(shape: [1, 1], scalars: [3])]])
    }

    func testControlCountErrors() {
        let nets = [FixedControlNet([]), FixedControlNet([])]
        var config = config()
        config.controlInputs = [Tensor(zeros: [1, 3, 16, 16])]
        XCTAssertThrowsError(try pipeline(nets: nets, controlled: RecordingControlledUnet()).generate(config)) {
            XCTAssertEqual("\($0)", "2 ControlNets, 1 --controlnet-inputs images and 1 scales: pass one image per ControlNet,"
                           + " in the same order, and one scale for all or one each")
        }
        config.controlInputs += config.controlInputs
        XCTAssertThrowsError(try pipeline(nets: nets).generate(config)) {
            XCTAssertEqual("\($0)", PipelineError.missingControlledUnet.description)
        }
    }

    func testMaskNeedsAnImage() {
        var config = config()
        config.mask = Tensor(zeros: [1, 1, 16, 16])
        XCTAssertThrowsError(try pipeline().generate(config)) { XCTAssertEqual("\($0)", PipelineError.maskWithoutImage.description) }
    }

    func testNearestMaskTakesEachBlocksTopLeft() {
        let mask = Tensor(shape: [1, 1, 4, 4], scalars: (0..<16).map(Float.init))
        XCTAssertEqual(StableDiffusionPipeline.nearest(mask, height: 2, width: 2).scalars, [0, 2, 8, 10])
    }

    /// The 9 channels: the scaled latents, the binarised mask at latent size, the masked image's scaled latents
    /// (its posterior sampled with the draw after the start noise).
    func testInpaintSampleChannels() throws {
        let unet = RecordingSampleUnet()
        var config = config(steps: 1)
        config.strength = 1
        config.startImage = Tensor(shape: [1, 3, 16, 16], scalars: (0..<768).map { Float($0 % 7) / 7 })
        config.mask = Tensor(shape: [1, 1, 16, 16], scalars: (0..<256).map { $0 % 16 < 8 ? 0.4 : 0.6 })
        _ = try pipeline(unet: unet).generate(config)
        let sample = try XCTUnwrap(unet.samples.first)
        XCTAssertEqual(sample.shape, [2, 9, 2, 2])
        XCTAssertEqual(Array(sample.scalars[16..<20]), [0, 1, 0, 1])  // left half kept, right half repainted
        var random = config.rng.makeSource(seed: config.seed)
        _ = random.normalTensor(shape: config.latentShape)
        let noise = random.normalTensor(shape: config.latentShape)
        let masked = Tensor(shape: [1, 3, 16, 16], scalars: config.startImage!.scalars.enumerated().map { i, x in
            i % 16 < 8 ? x : 0
        })
        let latents = try StableDiffusionPipeline.samplePosterior(moments: ClosedForm.Encoder().encode(image: masked), noise: noise)
        XCTAssertEqual(Array(sample.scalars[20..<36]), latents.scalars.map { $0 * StableDiffusionPipeline.defaultLatentScale })
        XCTAssertEqual(Array(sample.scalars[0..<36]), Array(sample.scalars[36...]))
    }

    /// The Python pipeline's generations on the same closed-form models (scripts/make_control_vectors.py).
    func testGenerationsMatchPython() throws {
        let data = try Data(contentsOf: Golden.testsFolder.appendingPathComponent("Resources/control_golden.json"))
        let golden = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let schedulerConfig = try SchedulerConfig(json: try JSONSerialization.data(withJSONObject: golden["scheduler_config"]!))
        let maskFrom = ints(golden["mask_from"])
        for entry in try XCTUnwrap(golden["cases"] as? [[String: Any]]) {
            let size = entry["latent_size"] as! Int
            let image = ClosedForm.testImageBytes(height: 8 * size, width: 8 * size)
            var config = GenerationConfig(prompt: entry["prompt"] as! String)
            config.negativePrompt = entry["negative_prompt"] as! String
            config.seed = UInt32(entry["seed"] as! Int)
            config.stepCount = entry["steps"] as! Int
            config.guidanceScale = Float((entry["guidance_scale"] as! NSNumber).doubleValue)
            config.scheduler = try XCTUnwrap(SchedulerKind(rawValue: entry["scheduler"] as! String))
            config.schedulerConfig = schedulerConfig
            config.latentShape = [1, 4, size, size]
            let gains = floats(entry["gains"])
            config.controlInputs = gains.indices.map { k in
                RGBImage(width: image.width, height: image.height, bytes: k % 2 == 0 ? image.bytes : image.bytes.map { 255 - $0 })
                    .unitTensor()
            }
            config.controlScales = floats(entry["scales"])
            let inpaint = entry["inpaint"] as! Bool
            let xl = entry["family"] as! String == "sdxl"
            if inpaint || entry["masked"] as! Bool {  // a 9-channel UNet, or the ControlNet inpaint route
                config.startImage = image.tensor()
                // None: the family's inpainting default (the Python pipeline's INPAINT_STRENGTH)
                config.strength = (entry["strength"] as? NSNumber)?.doubleValue ?? (xl ? StableDiffusionXLPipeline.defaultInpaintStrength : 1)
                config.mask = Tensor(shape: [1, 1, 8 * size, 8 * size], scalars: (0..<(64 * size * size)).map { i in
                    i / (8 * size) >= maskFrom[0] && i % (8 * size) >= maskFrom[1] ? 1 : 0
                })
            }
            if entry["inpaint_controlnet"] as! Bool {  // the inpaint ControlNet's condition: the masked image
                config.controlInputs = [StableDiffusionPipeline.inpaintControlCondition(image: image.unitTensor(), mask: config.mask!)]
            }
            let result: GeneratedImage
            if xl {
                config.originalSize = (entry["original_size"] as? [NSNumber])?.map(\.doubleValue)
                config.cropsCoordsTopLeft = (entry["crops_coords_top_left"] as! [NSNumber]).map(\.doubleValue)
                result = try XCTUnwrap(try xlPipeline(gains: gains, inpaint: inpaint).generate(config).first)
            } else {
                let pipe = pipeline(unet: inpaint ? ClosedFormControl.InpaintUnet() : ClosedForm.Denoiser(),
                                    nets: gains.map { ClosedFormControl.ControlNet(gain: $0) },
                                    controlled: gains.isEmpty ? nil : ClosedFormControl.ControlledUnet())
                result = try XCTUnwrap(try pipe.generate(config).first)
            }
            let label = "\(entry["family"]!) \(config.prompt) seed \(config.seed)"
            XCTAssertLessThanOrEqual(relativeError(result.latents.scalars, floats(entry["latents"])), 1e-6, label)
            let rgb = RGBImage(decoderOutput: result.image)
            XCTAssertEqual(rgb.bytes.prefix(48).map(Int.init), ints(entry["rgb_head"]), label)
            XCTAssertEqual(Int(CRC32.checksum(rgb.bytes)), entry["rgb_crc32"] as! Int, label)
        }
    }
}
