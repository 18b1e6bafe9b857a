import DiffuseCore
import Glibc
import Testing

/// PyTorch checkpoints written by torch.save itself (`Fixtures/torch/make_torch_fixtures.py`; one
/// rewritten as the zip64 archive torch writes past 4 GiB, which torch.load reads back): every
/// tensor must come out with torch's values under its flattened state-dict name, and the extras a
/// checkpoint carries (step counts, argparse and numpy objects) must be skipped, never run.
@Suite struct TorchCheckpointTests {
    static let directory: String = {
        if let dir = Files.environment("DIFFUSE_TORCH_FIXTURES") { return dir }
        let here = String(#filePath)
        return String(here[..<here.lastIndex(of: "/")!]) + "/Fixtures/torch"
    }()

    static func path(_ name: String) -> String { Files.join(directory, name) }

    static var manifest: JSON { (try? Files.readJSON(path("manifest.json"))) ?? .object([]) }

    @Test func tensorsMatchTorch() throws {
        let expected = try SafeTensorsFile(path: Self.path("expected.safetensors"))
        let files = Self.manifest["files"]?.array ?? []
        #expect(!files.isEmpty, "no fixture files listed in \(Self.path("manifest.json"))")
        for entry in files {
            let name = entry["file"]?.string ?? ""
            let checkpoint = try TensorFiles.open(Self.path(name))
            #expect(checkpoint is TorchCheckpointFile, "\(name) was not read as a PyTorch checkpoint")
            let names = (entry["names"]?.array ?? []).compactMap(\.string)
            #expect(checkpoint.tensorNames == names, "\(name): names \(checkpoint.tensorNames), torch saved \(names)")
            for tensor in names {
                let want = try expected.tensor("\(name)/\(tensor)")
                let got = try checkpoint.tensor(tensor)
                #expect(checkpoint.info(tensor)?.dtype == want.dtype && checkpoint.info(tensor)?.shape == want.shape)
                #expect(got.dtype == want.dtype && got.shape == want.shape, "\(name) \(tensor): \(got.dtype) \(got.shape), want \(want.dtype) \(want.shape)")
                let bytes = want.shape.reduce(1, *) * want.dtype.size
                #expect(memcmp(got.raw, want.raw, bytes) == 0, "\(name) \(tensor): values differ from torch's")
            }
        }
    }

    @Test func unreadableFilesAreRefusedByName() throws {
        for entry in Self.manifest["refused"]?.array ?? [] {
            let name = entry["file"]?.string ?? "", text = entry["message"]?.string ?? ""
            let error = #expect(throws: (any Error).self) { try TensorFiles.open(Self.path(name)) }
            #expect("\(error.map { "\($0)" } ?? "")".contains(name) && "\(error.map { "\($0)" } ?? "")".contains(text), "\(String(describing: error))")
        }
    }
}

