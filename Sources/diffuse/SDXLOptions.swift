import ArgumentParser
import DiffuseCore
import DiffusePipelines

/// SDXL's second prompt and size conditioning: diffusers' `prompt_2`, `negative_prompt_2`,
/// `original_size`, `crops_coords_top_left`, `target_size` and their `negative_` forms. Sizes are
/// written WxH like --size (diffusers' tuples are (height, width)); crops TOP,LEFT as diffusers'.
struct SDXLOptions: ParsableArguments {
    @Option(name: .customLong("prompt-2"), help: "SDXL: the prompt of the second text encoder (OpenCLIP ViT-bigG; diffusers' prompt_2). Default: the prompt. A refiner, which has only that encoder, reads the prompt, as in diffusers.")
    var prompt2: String?

    @Option(name: .customLong("negative-prompt-2"), help: "SDXL: the negative prompt of the second text encoder (diffusers' negative_prompt_2). Default: the negative prompt.")
    var negativePrompt2: String?

    @Option(name: .customLong("original-size"), help: ArgumentHelp("SDXL micro-conditioning: the size the image should look taken at (diffusers' original_size; default: the output size). Small sizes look upscaled and blurry.", valueName: "WxH"))
    var originalSize: String?

    @Option(name: .customLong("crops-coords-top-left"), help: ArgumentHelp("SDXL micro-conditioning: where the image should look cropped from (diffusers' crops_coords_top_left; default 0,0, a centred subject).", valueName: "top,left"))
    var cropsCoordsTopLeft: String?

    @Option(name: .customLong("target-size"), help: ArgumentHelp("SDXL micro-conditioning: the size the image is made for (diffusers' target_size; default: the output size).", valueName: "WxH"))
    var targetSize: String?

    @Option(name: .customLong("negative-original-size"), help: ArgumentHelp("SDXL: the original size to steer away from, e.g. 512x512 against low-resolution looks (diffusers' negative_original_size). From text it takes effect with --negative-target-size, as in diffusers.", valueName: "WxH"))
    var negativeOriginalSize: String?

    @Option(name: .customLong("negative-crops-coords-top-left"), help: ArgumentHelp("SDXL: the crop to steer away from (diffusers' negative_crops_coords_top_left; default 0,0).", valueName: "top,left"))
    var negativeCropsCoordsTopLeft: String?

    @Option(name: .customLong("negative-target-size"), help: ArgumentHelp("SDXL: the target size of the negative conditioning (diffusers' negative_target_size).", valueName: "WxH"))
    var negativeTargetSize: String?

    func validate() throws {
        for (option, value) in sizeOptions { if let value { _ = try parseSize(value, option: option, multipleOf: 1) } }
        for (option, value) in cropOptions { if let value { _ = try Self.crop(value, option: option) } }
    }

    private var sizeOptions: [(String, String?)] {
        [("--original-size", originalSize), ("--target-size", targetSize),
         ("--negative-original-size", negativeOriginalSize), ("--negative-target-size", negativeTargetSize)]
    }
    private var cropOptions: [(String, String?)] {
        [("--crops-coords-top-left", cropsCoordsTopLeft), ("--negative-crops-coords-top-left", negativeCropsCoordsTopLeft)]
    }

    func apply(to r: inout GenerationRequest) throws {
        (r.prompt2, r.negativePrompt2) = (prompt2, negativePrompt2)
        func size(_ s: String?, _ option: String) throws -> (height: Int, width: Int)? {
            try s.map { let (w, h) = try parseSize($0, option: option, multipleOf: 1); return (h, w) }
        }
        r.originalSize = try size(originalSize, "--original-size")
        r.targetSize = try size(targetSize, "--target-size")
        r.negativeOriginalSize = try size(negativeOriginalSize, "--negative-original-size")
        r.negativeTargetSize = try size(negativeTargetSize, "--negative-target-size")
        if let c = cropsCoordsTopLeft { r.cropsCoordsTopLeft = try Self.crop(c, option: "--crops-coords-top-left") }
        if let c = negativeCropsCoordsTopLeft { r.negativeCropsCoordsTopLeft = try Self.crop(c, option: "--negative-crops-coords-top-left") }
    }

    /// What diffusers would silently not use, said before the run.
    func warnings(fromText: Bool, zerosForEmptyNegative: Bool, negativePrompt: String?) -> [String] {
        var notes: [String] = []
        if negativePrompt2 != nil && negativePrompt == nil && zerosForEmptyNegative {
            notes.append("--negative-prompt-2 is unused without --negative-prompt: this model zeroes the negative conditioning "
                         + "when no negative prompt is given (force_zeros_for_empty_prompt), as diffusers does; add --negative-prompt \"\" to use it")
        }
        if fromText && (negativeOriginalSize == nil) != (negativeTargetSize == nil) {
            notes.append("from text, diffusers uses the negative sizes only when both --negative-original-size and --negative-target-size are given; "
                         + "the negative conditioning is the positive one")
        }
        return notes
    }

    /// The PNG record's fields (AUTOMATIC1111 has no names for these). Values holding its
    /// separators are quoted, as it quotes them.
    var parameterFields: [(String, String)] {
        func value(_ s: String) -> String { s.contains(where: { ",:\"\n".contains($0) }) ? JSON.quote(s) : s }
        var fields: [(String, String)] = []
        if let prompt2 { fields.append(("Prompt 2", value(prompt2))) }
        if let negativePrompt2 { fields.append(("Negative prompt 2", value(negativePrompt2))) }
        for (option, given) in sizeOptions + cropOptions {
            guard let given else { continue }
            let words = option.dropFirst(2).split(separator: "-")
            let name = words.first!.prefix(1).uppercased() + words.first!.dropFirst() + words.dropFirst().map { " " + $0 }.joined()
            fields.append((name, value(given)))
        }
        return fields
    }

    static func crop(_ s: String, option: String) throws -> (top: Int, left: Int) {
        let parts = s.split(separator: ",", omittingEmptySubsequences: false).map { $0.filter { !$0.isWhitespace } }
        guard parts.count == 2, let top = Int(parts[0]), let left = Int(parts[1]), top >= 0, left >= 0 else {
            throw ValidationError("\(option) must be TOP,LEFT in pixels, e.g. 0,0 (got \(s))")
        }
        return (top, left)
    }
}
