import DiffuseCore
import DiffusePipelines
import DiffuseTokenizer
import Testing

/// Every reference pipeline folder opens, and what comes out is what the files hold.
@Suite("Sources: diffusers folders")
struct DiffusersFolderTests {
    @Test(arguments: try ReferenceModel.all())
    func referenceFolderOpens(model: ReferenceModel) throws {
        let source = try ModelSource.open(model.folder)
        #expect(source.kind == .diffusersFolder)
        #expect(source.path == model.folder)
        let index = try Files.readJSON(Files.join(model.folder, "model_index.json"))
        #expect(source.pipelineClass == index["_class_name"]?.string)
        #expect(source.modelIndex?.bytes == (try Files.read(Files.join(model.folder, "model_index.json"))))

        // Every listed component, with its class, in model_index.json's order.
        let listed = try model.listedComponents()
        #expect(Array(source.components.prefix(listed.count)).map(\.name) == listed.map(\.name))
        for (name, className) in listed {
            let c = try source.component(name)
            #expect(c.className == className)
            #expect(c.location == Files.join(model.folder, name))
            try checkComponent(c, model: model)
        }
        // Extra model folders that model_index.json does not list (vae_tiny) come after.
        for name in try Files.list(model.folder) where !listed.contains(where: { $0.name == name }) {
            let config = Files.join(model.folder, name, "config.json")
            guard Files.exists(config), let cls = try Files.readJSON(config)["_class_name"]?.string else { continue }
            let c = try #require(source[name], "extra folder \(name) is not a component")
            #expect(c.className == cls)
            try checkComponent(c, model: model)
        }
    }

    /// Config bytes, tensor names and tensor bytes as the folder's files hold them.
    func checkComponent(_ c: ComponentSource, model: ReferenceModel) throws {
        let dir = Files.join(model.folder, c.name)
        switch c.kind {
        case .model:
            #expect(c.config?.bytes == (try Files.read(Files.join(dir, "config.json"))))
            #expect(c.config?.origin == Files.join(dir, "config.json"))
            let file = try #require(try model.weightsFile(c.name))
            let weights = try #require(c.weights)
            #expect(weights.tensorNames.sorted() == file.tensorNames.sorted(), "\(c.name)")
            for name in file.tensorNames {
                #expect(identical(try weights.tensor(name), try file.tensor(name)), "\(c.name): \(name)")
            }
            #expect(c.variant == nil)
        case .scheduler:
            #expect(c.config?.bytes == (try Files.read(Files.join(dir, "scheduler_config.json"))))
            #expect(c.weights == nil)
        case .tokenizer:
            #expect(c.tokenizer == .folder(dir))
            let direct = try CLIPTokenizer(folder: dir)
            let viaSource = try c.makeTokenizer()
            for prompt in ["a photo of a cat", "Hello, world!!! 123"] { #expect(viaSource(prompt) == direct(prompt)) }
        }
    }

    @Test func openingWritesNothing() throws {
        let dir = try TemporaryDirectory()
        for model in try ReferenceModel.all() { try copyTree(model.folder, to: dir.join(model.variant)) }
        let before = try listTree(dir.path)
        for model in try ReferenceModel.all() {
            let source = try ModelSource.open(dir.join(model.variant))
            _ = try ModelDescription.describe(source)
        }
        #expect(try listTree(dir.path) == before)
    }

    @Test func pipelineSettingsAreNotComponents() throws {
        for model in try ReferenceModel.all() {
            let source = try ModelSource.open(model.folder)
            let index = try Files.readJSON(Files.join(model.folder, "model_index.json"))
            for (key, value) in index.members ?? [] where !key.hasPrefix("_") {
                if value.array == nil {
                    #expect(source.pipelineSetting(key) == value, "\(model.variant): \(key)")
                    #expect(source[key] == nil)
                } else if value.array?.allSatisfy(\.isNull) == true {
                    #expect(source[key] == nil, "\(model.variant): \(key) is [null, null]")
                }
            }
        }
    }

    @Test func replacingAComponent() throws {
        let models = try ReferenceModel.all()
        let model = try #require(models.first { Files.isDirectory(Files.join($0.folder, "vae_tiny")) })
        let source = try ModelSource.open(model.folder)
        let tiny = try VAESource.open(Files.join(model.folder, "vae_tiny"))
        #expect(tiny.name == "vae" && tiny.className == "AutoencoderTiny")
        let swapped = source.replacing(tiny)
        #expect(try swapped.component("vae").className == "AutoencoderTiny")
        #expect(swapped.components.map(\.name) == source.components.map(\.name))
        #expect(try source.component("vae").className == "AutoencoderKL")
    }
}
