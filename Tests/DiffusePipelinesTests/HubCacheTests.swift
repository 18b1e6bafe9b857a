import DiffuseCore
import DiffusePipelines
import FoundationEssentials
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A Hugging Face cache laid out as huggingface_hub lays it out: `refs/<revision>` holds the
/// commit, `snapshots/<commit>/…` are relative links into `blobs/`.
struct FakeHubCache {
    let root: String

    /// Adds `folder` as `repo` at `commit`, its files as blobs, and points `refs/<ref>` at it.
    @discardableResult
    func add(_ folder: String, repo: String, commit: String, ref: String? = "main") throws -> String {
        let repoFolder = Files.join(root, "models--" + repo.split(separator: "/").joined(separator: "--"))
        let snapshot = Files.join(repoFolder, "snapshots", commit)
        try Files.createDirectory(Files.join(repoFolder, "blobs"))
        for (i, file) in try listTree(folder).enumerated() {
            let blob = "blob\(commit.prefix(8))\(i)"
            try Files.write(try Files.read(Files.join(folder, file)), to: Files.join(repoFolder, "blobs", blob))
            let link = Files.join(snapshot, file)
            let depth = file.split(separator: "/").count - 1
            try Files.createDirectory(String(link.dropLast(file.split(separator: "/").last!.count + 1)))
            try makeLink(String(repeating: "../", count: depth + 2) + "blobs/" + blob, at: link)
        }
        if let ref {
            try Files.createDirectory(Files.join(repoFolder, "refs", String(ref.split(separator: "/").dropLast().joined(separator: "/"))))
            try Files.write(Array(commit.utf8), to: Files.join(repoFolder, "refs", ref))
        }
        return snapshot
    }
}

@Suite("Sources: Hugging Face cache", .serialized)
struct HubCacheTests {
    let commit = "0123456789abcdef0123456789abcdef01234567"
    let older = "fedcba9876543210fedcba9876543210fedcba98"

    @Test func repoIdResolvesThroughRefsAndLinks() throws {
        let cache = try TemporaryDirectory()
        let model = try #require(try ReferenceModel.all().first)
        let snapshot = try FakeHubCache(root: cache.path).add(model.folder, repo: "test-org/\(model.variant)", commit: commit)
        let before = try listTree(cache.path)

        let source = try ModelSource.open("test-org/\(model.variant)", options: .init(hubCache: cache.path))
        #expect(source.kind == .huggingFaceCache(repo: "test-org/\(model.variant)", revision: "main", commit: commit))
        #expect(source.path == snapshot)
        let folder = try ModelSource.open(model.folder)
        #expect(source.components.map(\.name) == folder.components.map(\.name))
        for c in folder.components {
            guard let want = c.weights else { continue }
            let got = try #require(source[c.name]?.weights)
            #expect(got.tensorNames == want.tensorNames)
            for name in want.tensorNames { #expect(identical(try got.tensor(name), try want.tensor(name)), "\(c.name): \(name)") }
        }
        #expect(try source.component("tokenizer").makeTokenizer()("a photo of a cat")
                == folder.component("tokenizer").makeTokenizer()("a photo of a cat"))
        #expect(try listTree(cache.path) == before, "opening wrote into the cache")
    }

    @Test func revisionsBranchesAndCommits() throws {
        let cache = try TemporaryDirectory()
        let models = try ReferenceModel.all()
        let hub = FakeHubCache(root: cache.path)
        try hub.add(models[0].folder, repo: "org/model", commit: commit)
        try hub.add(models[models.count > 1 ? 1 : 0].folder, repo: "org/model", commit: older, ref: "pr/1")
        let options = ModelSourceOptions(hubCache: cache.path)

        let pr = try ModelSource.open("org/model@pr/1", options: options)
        #expect(pr.kind == .huggingFaceCache(repo: "org/model", revision: "pr/1", commit: older))
        let byCommit = try ModelSource.open("org/model@\(commit)", options: options)
        #expect(byCommit.kind == .huggingFaceCache(repo: "org/model", revision: commit, commit: commit))

        let text = try #require(message { try ModelSource.open("org/model@v2", options: options) })
        #expect(text.contains("'v2'") && text.contains("main") && text.contains("pr/1"), "\(text)")
    }

    @Test func environmentChoosesTheCache() throws {
        let cache = try TemporaryDirectory()
        let model = try #require(try ReferenceModel.all().first)
        try FakeHubCache(root: cache.join("hub")).add(model.folder, repo: "org/env-model", commit: commit)
        let saved = ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"].map { ($0, Files.environment($0)) }
        defer { for (name, value) in saved { if let value { setenv(name, value, 1) } else { unsetenv(name) } } }
        for (name, _) in saved { unsetenv(name) }

        setenv("HF_HOME", cache.path, 1)
        #expect(HuggingFaceCache.directory == cache.join("hub"))
        #expect(try ModelSource.open("org/env-model").path?.hasPrefix(cache.join("hub")) == true)
        setenv("HF_HUB_CACHE", cache.join("elsewhere"), 1)
        #expect(HuggingFaceCache.directory == cache.join("elsewhere"))
        let text = try #require(message { try ModelSource.open("org/env-model") })
        #expect(text.contains("not found in the Hugging Face cache at \(cache.join("elsewhere"))") && text.contains("never downloads"), "\(text)")
    }

    @Test func missingAndBrokenCacheEntries() throws {
        let cache = try TemporaryDirectory()
        let model = try #require(try ReferenceModel.all().first)
        let options = ModelSourceOptions(hubCache: cache.path)

        let absent = try #require(message { try ModelSource.open("org/absent", options: options) })
        #expect(absent.contains("org/absent: not found in the Hugging Face cache at \(cache.path)") && absent.contains("never downloads"))

        // A ref that points at a snapshot that is not there.
        let snapshot = try FakeHubCache(root: cache.path).add(model.folder, repo: "org/partial", commit: commit)
        try FileManager.default.removeItem(atPath: snapshot)
        let gone = try #require(message { try ModelSource.open("org/partial", options: options) })
        #expect(gone.contains(commit) && gone.contains("missing"), "\(gone)")

        // An interrupted download: a snapshot link whose blob is missing.
        let broken = try FakeHubCache(root: cache.path).add(model.folder, repo: "org/broken", commit: commit)
        let unetFile = try #require(try listTree(broken).first { $0.hasPrefix("unet/") && $0.hasSuffix(".safetensors") })
        let blob = Files.join(broken, unetFile)
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(blob, &buffer, 4095)
        let target = Files.join(String(blob.dropLast(unetFile.split(separator: "/").last!.count + 1)),
                                String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self))
        try FileManager.default.removeItem(atPath: target)
        let text = try #require(message { try ModelSource.open("org/broken", options: options) })
        #expect(text.contains(blob) && text.contains("interrupted download"), "\(text)")
    }

    @Test func repoIdSyntax() {
        #expect(HuggingFaceCache.parseRepoID("runwayml/stable-diffusion-v1-5")! == ("runwayml/stable-diffusion-v1-5", nil))
        #expect(HuggingFaceCache.parseRepoID("stabilityai/sdxl-turbo@fp16")! == ("stabilityai/sdxl-turbo", "fp16"))
        for bad in ["model", "a/b/c", "/abs/path", "./x/y", "org/../x", "org/", "org/name@"] {
            #expect(HuggingFaceCache.parseRepoID(bad) == nil, "\(bad)")
        }
    }
}
