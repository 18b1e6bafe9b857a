import DiffuseCore
import DiffuseGraph
import DiffuseModels

/// diffusers' `StableDiffusionSafetyChecker`, the `safety_checker/` of the SD 1.x folders
/// (CompVis, runwayml and their copies): a CLIP ViT-L/14 image encoder whose projected embedding
/// is compared (cosine) with 17 concept and 3 "special care" embeddings, each against its own
/// threshold. An image that passes a concept's threshold is returned black, as diffusers returns
/// it; a special-care match lowers every later threshold for that image by 0.01.
public struct SafetyCheckerComponent {
    public static let className = "StableDiffusionSafetyChecker"
    /// The image encoder: its weights under `vision_model.vision_model` (the checker wraps a whole
    /// transformers `CLIPVisionModel`; the SD 1.x files) or `vision_model` (saved by transformers
    /// 5), and `visual_projection`.
    public var model: CLIPVisionModelWithProjection
    public var weights: ModelWeights
    /// The pipeline's `feature_extractor/`: what the checker sees of each image.
    public var processor: CLIPImageProcessor
    /// What the images are compared with.
    public var concepts: SafetyConcepts

    static let conceptTensors = ["concept_embeds", "concept_embeds_weights", "special_care_embeds", "special_care_embeds_weights"]

    /// Opens a `safety_checker/` folder (a transformers `CLIPConfig` and the checker's weights)
    /// with the pipeline's `feature_extractor/preprocessor_config.json` when there is one.
    public static func load(_ folder: String, featureExtractor: String?, options: ModelSourceOptions = .init()) throws -> SafetyCheckerComponent {
        let source = try DiffusersFolder.component(name: "safety_checker", library: "stable_diffusion", className: className,
                                                   folder: folder, variant: options.variant, listedIn: nil)
        let tensors = try source.requireWeights()
        // transformers 4 saved the wrapped CLIPVisionModel's ViT one level deeper than 5 does.
        let nested = tensors.info("vision_model.vision_model.embeddings.class_embedding") != nil
        let model = try CLIPVisionModelWithProjection(configPath: Files.join(folder, "config.json"),
                                                      encoderScope: nested ? ["vision_model", "vision_model"] : ["vision_model"])
        try model.checkWeights(tensors, alsoReading: Set(conceptTensors), owner: className)
        let width = model.config.projectionDim
        /// A [rows, width] table's rows, each made unit length.
        func unitRows(_ name: String) throws -> [[Float]] {
            guard let info = tensors.info(name), info.shape.count == 2, info.shape[1] == width else {
                throw PipelineError("\(tensors.origin): \(name) must be [concepts, \(width)] (the projection width); it is \(tensors.info(name).map { "\($0.shape)" } ?? "missing")")
            }
            let t = try tensors.tensor(name).converted(to: .float32).toFloatArray()
            return (0..<info.shape[0]).map { SafetyConcepts.unit(Array(t[($0 * width)..<(($0 + 1) * width)])) }
        }
        func thresholds(_ name: String, count: Int) throws -> [Float] {
            guard let info = tensors.info(name), info.shape == [count] else {
                throw PipelineError("\(tensors.origin): \(name) must hold one threshold per concept ([\(count)]); it is \(tensors.info(name).map { "\($0.shape)" } ?? "missing")")
            }
            return try tensors.tensor(name).converted(to: .float32).toFloatArray()
        }
        let concepts = try unitRows("concept_embeds"), special = try unitRows("special_care_embeds")
        let processor = try ImageEncoderComponent.processor(featureExtractor, for: model, what: "the safety checker \(folder)")
        return SafetyCheckerComponent(model: model, weights: ModelWeights(tensors), processor: processor,
                                      concepts: SafetyConcepts(concepts: concepts, conceptThresholds: try thresholds("concept_embeds_weights", count: concepts.count),
                                                               specialCare: special, specialCareThresholds: try thresholds("special_care_embeds_weights", count: special.count)))
    }
}

/// The safety checker's concept embeddings (`concept_embeds`, `special_care_embeds`, each row
/// unit length as `F.normalize` makes it) with their thresholds (`concept_embeds_weights`,
/// `special_care_embeds_weights`), and diffusers' scoring against them.
public struct SafetyConcepts: Sendable {
    public var concepts: [[Float]], conceptThresholds: [Float]
    public var specialCare: [[Float]], specialCareThresholds: [Float]

    /// `v` divided by its norm (at least 1e-12), as `F.normalize` divides it.
    static func unit(_ v: [Float]) -> [Float] {
        let norm = max(v.reduce(Float(0)) { $0 + $1 * $1 }.squareRoot(), 1e-12)
        return v.map { $0 / norm }
    }

    /// Which images the checker flags, from their `image_embeds` [N, width]: diffusers'
    /// `forward`. Scores are numpy's float32 `round(cos - threshold + adjustment, 3)`, flagged
    /// above 0; the adjustment becomes 0.01 at an image's first special-care match.
    public func flags(imageEmbeds: Tensor) -> [Bool] {
        let width = imageEmbeds.shape[1]
        let all = imageEmbeds.converted(to: .float32).toFloatArray()
        return (0..<imageEmbeds.shape[0]).map { i in
            let e = Self.unit(Array(all[(i * width)..<((i + 1) * width)]))
            func cosine(_ c: [Float]) -> Float { zip(e, c).reduce(Float(0)) { $0 + $1.0 * $1.1 } }
            // numpy 2 keeps float32 for a float32 minus Python floats; round(x, 3) is rint(x·1000)/1000.
            func passes(_ cos: Float, _ threshold: Float, _ adjustment: Float) -> Bool {
                ((cos - threshold + adjustment) * 1000).rounded(.toNearestOrEven) > 0
            }
            var adjustment: Float = 0
            for (c, threshold) in zip(specialCare, specialCareThresholds) where passes(cosine(c), threshold, adjustment) {
                adjustment = 0.01
            }
            return zip(concepts, conceptThresholds).contains { passes(cosine($0.0), $0.1, adjustment) }
        }
    }
}

extension StableDiffusionPipeline {
    /// diffusers' `run_safety_checker` on the decoded images: the model's checker, if it has one,
    /// sees each through the feature extractor; flagged images become black. Returns the images
    /// and the flags (nil without a checker, diffusers' `nsfw_content_detected`).
    func runSafetyChecker(_ images: [Image]) throws -> (images: [Image], flags: [Bool]?) {
        guard let checker = components.safetyChecker, !images.isEmpty else { return (images, nil) }
        let flags = checker.concepts.flags(imageEmbeds: try safetyCheckerEmbeds(images, checker))
        if flags.contains(true) {
            Log.warning("Potential NSFW content was detected in image(s) \(flags.indices.filter { flags[$0] }.map { "\($0 + 1)" }.joined(separator: ", ")) "
                        + "by the model's safety checker; a black image is returned instead (as diffusers does). Try another prompt or seed, "
                        + "or --no-safety-checker (diffusers' safety_checker=None).")
        }
        return (zip(images, flags).map { image, flagged in flagged ? Image(width: image.width, height: image.height, channels: image.channels) : image },
                flags)
    }

    /// What the checker's encoder makes of `images` (its `visual_projection` of each): [N, P].
    func safetyCheckerEmbeds(_ images: [Image], _ checker: SafetyCheckerComponent) throws -> Tensor {
        let exe = try executable("safety_checker|\(images.count)", weights: checker.weights, options: textEncoderCompileOptions) {
            try checker.model.graph(batch: images.count, outputs: [.imageEmbeds])
        }
        let pixels = try backend.upload(concatenate(images.map(checker.processor.pixelValues), axis: 0))
        let embeds = try exe.run([CLIPVisionModelWithProjection.pixelValues: pixels])[CLIPVisionOutput.imageEmbeds.name]!
            .toHost().converted(to: .float32).copy()
        release("safety_checker", [checker.weights])
        return embeds
    }
}
