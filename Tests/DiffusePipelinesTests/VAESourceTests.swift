import DiffuseCore
import DiffuseModels
import DiffusePipelines
import Testing

@Suite("Sources: swapping the VAE")
struct VAESourceTests {
    func models(withTiny: Bool) throws -> [ReferenceModel] {
        try ReferenceModel.all().filter { !withTiny || Files.isDirectory(Files.join($0.folder, "vae_tiny")) }
    }

    func expectSameWeights(_ got: TensorSource?, _ want: TensorSource?, _ label: String) throws {
        let got = try #require(got), want = try #require(want)
        #expect(got.tensorNames.sorted() == want.tensorNames.sorted(), "\(label)")
        for name in want.tensorNames { #expect(identical(try got.tensor(name), try want.tensor(name)), "\(label): \(name)") }
    }

    @Test func folders() throws {
        let model = try #require(try models(withTiny: true).first)
        let kl = try VAESource.open(Files.join(model.folder, "vae"))
        #expect(kl.name == "vae" && kl.className == "AutoencoderKL")
        #expect(kl.config?.origin == Files.join(model.folder, "vae/config.json"))
        let tiny = try VAESource.open(Files.join(model.folder, "vae_tiny"))
        #expect(tiny.className == "AutoencoderTiny")
        // A pipeline folder lends its VAE.
        let fromPipeline = try VAESource.open(model.folder)
        try expectSameWeights(fromPipeline.weights, kl.weights, "pipeline vae")
        // A folder of something else is refused, naming its class.
        let text = try #require(message { try VAESource.open(Files.join(model.folder, "unet")) })
        #expect(text.contains("UNet2DConditionModel") && text.contains("not a VAE"), "\(text)")
    }

    /// LDM-layout VAE files, bare (`vae-ft-mse-…`) or inside a whole checkpoint, with the model's
    /// VAE config; and diffusers-layout files.
    @Test(arguments: try ReferenceModel.withOriginalLayout())
    func singleFiles(model: ReferenceModel) throws {
        let folder = try ModelSource.open(model.folder)
        let vae = try folder.component("vae")
        let config = try vae.requireConfig()
        let want = try #require(vae.weights)
        let dir = try TemporaryDirectory()

        for prefix in ["", "first_stage_model.", "vae."] {
            let mapping = try LDMKeyTables.vae(config: config, sourcePrefix: prefix)
            let tensors = try want.tensorNames.map { name -> (String, Tensor) in
                let (source, transform) = try #require(mapping.source(forTarget: name))
                let t = try want.tensor(name)
                return (prefix + source, transform == .convToLinear ? t.reshaped(t.shape + [1, 1]) : t)
            }
            let path = dir.join("vae\(prefix.isEmpty ? "" : "-" + prefix.dropLast()).safetensors")
            try SafeTensors.write(tensors, to: path)
            #expect(SafeTensorsLayout.detect(try SafeTensorsFile(path: path)) == .ldmVAE(prefix: prefix))
            let got = try VAESource.open(path, modelVAEConfig: config)
            #expect(got.className == "AutoencoderKL" && got.config == config)
            try expectSameWeights(got.weights, want, "LDM VAE \(prefix)")
            // Without the model's config, SD 1.5's is assumed; the tiny VAE does not fit it, and the error says so.
            let text = try #require(message { try VAESource.open(path) })
            #expect(text.contains("embedded sd15/vae/config.json"), "\(text)")
        }

        let family = try family(of: folder)
        let checkpoint = dir.join("checkpoint.safetensors")
        try SafeTensors.write(try originalLayoutTensors(folder, family: family), to: checkpoint)
        try expectSameWeights(try VAESource.open(checkpoint, modelVAEConfig: config).weights, want, "checkpoint's VAE")

        let diffusersFile = dir.join("diffusion_pytorch_model.safetensors")
        try SafeTensors.write(try want.tensorNames.map { ($0, try want.tensor($0)) }, to: diffusersFile)
        try expectSameWeights(try VAESource.open(diffusersFile, modelVAEConfig: config).weights, want, "diffusers VAE file")
    }

    /// TAESD as diffusers saves it and as taesd.py's module saves it (decoder indices one higher).
    @Test func tinyAutoencoderFiles() throws {
        let model = try #require(try models(withTiny: true).first)
        let tiny = try VAESource.open(Files.join(model.folder, "vae_tiny"))
        let want = try #require(tiny.weights)
        let dir = try TemporaryDirectory()

        let diffusersFile = dir.join("taesd-diffusers.safetensors")
        try SafeTensors.write(try want.tensorNames.map { ($0, try want.tensor($0)) }, to: diffusersFile)
        let options = ModelSourceOptions(config: Files.join(model.folder, "vae_tiny"))
        let a = try VAESource.open(diffusersFile, options: options)
        #expect(a.className == "AutoencoderTiny" && a.config == tiny.config)
        try expectSameWeights(a.weights, want, "diffusers TAESD file")

        // taesd.py: `encoder.N…`, and `decoder.N…` counting the clamp diffusers leaves out.
        let module = try want.tensorNames.map { name -> (String, Tensor) in
            let parts = name.split(separator: ".")
            let index = Int(parts[2])! + (parts[0] == "decoder" ? 1 : 0)
            return (([String(parts[0]), String(index)] + parts.dropFirst(3).map(String.init)).joined(separator: "."), try want.tensor(name))
        }
        let moduleFile = dir.join("taesd-module.safetensors")
        try SafeTensors.write(module, to: moduleFile)
        #expect(SafeTensorsLayout.detect(try SafeTensorsFile(path: moduleFile)) == .tinyVAE(.taesdModule))
        try expectSameWeights(try VAESource.open(moduleFile, options: options).weights, want, "taesd.py module")

        // Without a config: the built-in TAESD config with these weights' latent channels.
        let inferred = try VAESource.open(diffusersFile)
        let latent = try #require(want.info("decoder.layers.0.weight")?.shape[1])
        #expect(try inferred.requireConfig().json()["latent_channels"]?.int == latent)
        #expect(try inferred.requireConfig().origin.contains("embedded taesd/config.json"))
    }

    /// The real TAEF2 files of the shared data (taesd.py's separate encoder and decoder, with the
    /// mid-block pool branch): the config inferred from the weights builds models whose declared
    /// parameters are exactly the files' tensors.
    @Test func realTaesdFiles() throws {
        for (file, part) in [("taef2/decoder.safetensors", "decoder"), ("taef2/encoder.safetensors", "encoder")] {
            let path = Fixtures.data(file)
            let vae = try VAESource.open(path)
            #expect(vae.className == "AutoencoderTiny")
            #expect(vae.notes.contains { $0.hasPrefix("\(part) only") })
            let config = try vae.requireConfig()
            let model = try AutoencoderTiny(config: decodeConfiguration(AutoencoderTiny.Configuration.self, from: config.bytes, origin: config.origin))
            let weights = try #require(vae.weights)
            let declared: any ModelComponent = part == "decoder" ? model.decoder : model.encoder
            #expect(try declared.checkWeights(weights).isEmpty)
            let file = try SafeTensorsFile(path: path)
            #expect(weights.tensorNames.count == file.tensorNames.count)
            #expect(try weights.tensorNames.allSatisfy { $0.hasPrefix("\(part).layers.") })
            #expect(try config.json()["use_midblock_gn"]?.bool == true)
        }
    }
}
