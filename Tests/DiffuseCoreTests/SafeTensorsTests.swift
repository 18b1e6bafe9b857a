import DiffuseCore
import Testing
#if canImport(Glibc)
import Glibc
#endif

private func temporaryPath(_ name: String) -> String {
    let dir = "/tmp/diffuse-tests-\(getpid())"
    try? Files.createDirectory(dir)
    return dir + "/" + name
}

/// A file whose header is `header` (padded as given) followed by `data` bytes.
private func writeRaw(_ name: String, header: String, data: Int = 0, lengthOverride: UInt64? = nil) throws -> String {
    var bytes: [UInt8] = []
    let h = Array(header.utf8)
    withUnsafeBytes(of: (lengthOverride ?? UInt64(h.count)).littleEndian) { bytes.append(contentsOf: $0) }
    bytes += h
    bytes += [UInt8](repeating: 7, count: data)
    let path = temporaryPath(name)
    try Files.write(bytes, to: path)
    return path
}

private func expectError(_ path: String, _ match: (SafeTensorsError) -> Bool, _ label: String) {
    do {
        _ = try SafeTensorsFile(path: path)
        Issue.record("\(label): a malformed file was accepted")
    } catch let e as SafeTensorsError {
        #expect(match(e), "\(label): wrong error: \(e)")
        #expect(e.description.contains(path), "\(label): the message does not name the file: \(e)")
    } catch {
        Issue.record("\(label): unexpected error \(error)")
    }
}

@Suite("safetensors")
struct SafeTensorsTests {
    @Test("round trip of every dtype, with metadata, zero-copy reads")
    func roundTrip() throws {
        var tensors: [(String, Tensor)] = []
        for (i, dtype) in DType.allCases.enumerated() {
            let t = Tensor(zeros: [2, 3, i + 1], dtype: dtype)
            for k in 0..<t.count { t.setElement(k, Double((k * 7 + i) % 11) - 4) }
            tensors.append(("t.\(dtype.rawValue)", t))
        }
        tensors.append(("empty", Tensor(zeros: [0, 4])))
        let path = temporaryPath("roundtrip.safetensors")
        try SafeTensors.write(tensors, metadata: [("format", "pt")], to: path)
        let file = try SafeTensorsFile(path: path)
        #expect(file.names == tensors.map(\.0))
        #expect(file.metadata.map(\.0) == ["format"] && file.metadata.map(\.1) == ["pt"])
        for (name, t) in tensors {
            let r = try file.tensor(name)
            #expect(r.dtype == t.dtype && r.shape == t.shape, "\(name)")
            #expect(memcmp(r.raw, t.raw, t.byteCount) == 0, "\(name): data differs")
        }
    }

    @Test("float conversions: f16 via F16C, bf16 rounding to nearest even as torch")
    func conversions() {
        let values: [Float] = [1, -2.5, 3.14159265, 65504, 1e-8, 1.00390625, 1.01171875, -0.0, .infinity, .nan]
        let t = Tensor(shape: [values.count], floats: values)
        let h = t.converted(to: .float16).converted(to: .float32).toFloatArray()
        for (v, r) in zip(values, h) { #expect(v.isNaN ? r.isNaN : r == Float(Float16(v))) }
        // 1.00390625 = 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125: even wins (1.0).
        // 1.01171875 = 1 + 3·2^-8 is a tie between 1.0078125 and 1.015625: even wins (1.015625).
        let b = t.converted(to: .bfloat16)
        let bits = (0..<values.count).map { b.pointer(as: UInt16.self)[$0] }
        #expect(bits[5] == 0x3F80 && bits[6] == 0x3F82)
        #expect(bits[9] == 0x7FC0, "NaN becomes torch's quiet NaN")
        #expect(b.converted(to: .float32).toFloatArray()[2] == 3.140625)
    }

    @Test("sharded checkpoint through its index")
    func sharded() throws {
        let a = Tensor(shape: [2], floats: [1, 2]), b = Tensor(shape: [3], floats: [3, 4, 5])
        try SafeTensors.write([("a", a)], to: temporaryPath("model-00001-of-00002.safetensors"))
        try SafeTensors.write([("b", b)], to: temporaryPath("model-00002-of-00002.safetensors"))
        let index = #"{"metadata": {"total_size": 20}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#
        let indexPath = temporaryPath("model.safetensors.index.json")
        try Files.write(Array(index.utf8), to: indexPath)
        let s = try SafeTensors.open(indexPath)
        #expect(s.tensorNames == ["a", "b"])
        #expect(try s.tensor("b").toFloatArray() == [3, 4, 5])
        // A shard named in the index but absent is an error naming it.
        let bad = #"{"weight_map": {"a": "missing.safetensors"}}"#
        let badPath = temporaryPath("bad.safetensors.index.json")
        try Files.write(Array(bad.utf8), to: badPath)
        #expect(throws: FileError.self) { try SafeTensors.open(badPath) }
    }

    @Test("every malformed file is rejected with its own error naming the file")
    func malformed() throws {
        let entry = #""w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}"#
        // Truncated below the 8-byte length.
        let tiny = temporaryPath("tiny.safetensors")
        try Files.write([1, 2, 3], to: tiny)
        expectError(tiny, { if case .truncated = $0 { true } else { false } }, "truncated")
        // Header length past the end.
        expectError(try writeRaw("past.safetensors", header: "{\(entry)}", data: 16, lengthOverride: 1 << 40),
                    { if case .headerPastEnd = $0 { true } else { false } }, "header length past the end")
        // Invalid JSON.
        expectError(try writeRaw("json.safetensors", header: "{\"w\": [", data: 16),
                    { if case .invalidHeader = $0 { true } else { false } }, "invalid JSON")
        // Unknown dtype.
        expectError(try writeRaw("dtype.safetensors", header: #"{"w": {"dtype": "F12", "shape": [4], "data_offsets": [0, 16]}}"#, data: 16),
                    { if case .unknownDType(_, "w", "F12") = $0 { true } else { false } }, "unknown dtype")
        // Offsets out of range (a data section shorter than the header says: truncated data).
        expectError(try writeRaw("range.safetensors", header: "{\(entry)}", data: 8),
                    { if case .offsetsOutOfRange(_, "w", _, _, _) = $0 { true } else { false } }, "offsets out of range")
        // Overlapping tensors.
        expectError(try writeRaw("overlap.safetensors", header: #"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#, data: 12),
                    { if case .overlapping = $0 { true } else { false } }, "overlapping")
        // Shape and byte count disagree.
        expectError(try writeRaw("size.safetensors", header: #"{"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}"#, data: 16),
                    { if case .sizeMismatch(_, "w", [3, 2], .float32, 24, 16) = $0 { true } else { false } }, "shape/byte-count mismatch")
        // Duplicate names.
        expectError(try writeRaw("dup.safetensors", header: "{\(entry), \(entry)}", data: 16),
                    { if case .duplicateName(_, "w") = $0 { true } else { false } }, "duplicate names")
        // Missing fields.
        expectError(try writeRaw("fields.safetensors", header: #"{"w": {"dtype": "F32", "shape": [4]}}"#, data: 16),
                    { if case .invalidEntry(_, "w", _) = $0 { true } else { false } }, "missing data_offsets")
        // Asking for a tensor that is not there names it.
        let ok = try writeRaw("ok.safetensors", header: "{\(entry)}", data: 16)
        #expect(throws: SafeTensorsError.missingTensor(file: ok, tensor: "nope")) { try SafeTensorsFile(path: ok).tensor("nope") }
        // A missing file names the path.
        #expect(throws: FileError.self) { try SafeTensorsFile(path: temporaryPath("absent.safetensors")) }
    }

    @Test("the JSON parser keeps key order, detects duplicates, round-trips")
    func json() throws {
        let text = #"{"b": [1, 2.5, -3e2, true, null], "a": {"x": "é\n\u00e9"}}"#
        let v = try JSON.parse(text)
        #expect(v.members?.map(\.0) == ["b", "a"])
        #expect(try JSON.parse(v.serialized()) == v)
        #expect(v["a"]?["x"]?.string == "é\né")
        #expect(throws: JSON.ParseError.self) { try JSON.parse(#"{"a": 1, "a": 2}"#, rejectDuplicateKeys: true) }
        #expect(throws: JSON.ParseError.self) { try JSON.parse("[1, 2") }
    }
}
