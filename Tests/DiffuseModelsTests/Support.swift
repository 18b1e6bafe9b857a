import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import Foundation
import Testing

/// A backend and the options a test compiles with, plus the tolerance that fits its kernels.
struct TestBackend: CustomStringConvertible {
    let name: String
    let backend: Backend
    let options: CompileOptions
    /// Whether the kernels sum in another order than torch (GEMM tiling, fused attention): the
    /// README then allows the looser float32 tolerance.
    let reordersSums: Bool
    /// Largest graph (in FLOPs) this backend runs in a test; the naive reference is slow.
    let flopLimit: Double

    var description: String { name }
    var tolerance: Double { reordersSums ? Tolerances.float32Reordered : Tolerances.float32 }
}

/// The backends every golden test runs on.
enum TestBackends {
    static let all: [TestBackend] = {
        var list = [TestBackend(name: "reference", backend: ReferenceBackend(), options: CompileOptions(), reordersSums: false,
                                flopLimit: referenceFlopLimit)]
        if let cpu = try? CPUBackend() {
            // oneDNN's tiling and the flash-style attention sum in other orders, which the README
            // allows 10x more for; the errors seen are ~1e-6 relative, so the strict bound holds.
            list.append(TestBackend(name: "cpu (fused attention)", backend: cpu, options: CompileOptions(attention: .fused),
                                    reordersSums: false, flopLimit: .infinity))
            list.append(TestBackend(name: "cpu (math attention)", backend: cpu, options: CompileOptions(attention: .math),
                                    reordersSums: false, flopLimit: .infinity))
        }
        return list
    }()

    /// Why the CPU backend is missing from `all`, if it is.
    static var cpuUnavailable: String? {
        do { _ = try CPUBackend(); return nil } catch { return "\(error)" }
    }

    /// The reference interpreter loops over every multiply-add with index arithmetic; in a debug
    /// build it manages a few tens of MFLOP/s.
    static var referenceFlopLimit: Double {
        #if DEBUG
        return 3e9
        #else
        return 3e10
        #endif
    }
}

/// The float32 tolerances of the fixture README ("Tolerances"): max abs error ≤ t × max(1, max|ref|).
enum Tolerances {
    static let float32: Double = parsed.strict
    static let float32Reordered: Double = parsed.reordered

    private static let parsed: (strict: Double, reordered: Double) = {
        // "- Text encoder, UNet, VAE and vae_tiny outputs in float32: max abs error ≤ 1e-4 × ...
        //   Use 1e-3 if the kernels use a different reduction order, ..."
        guard let text = try? Files.readText(Fixtures.reference("README.md")),
              let section = text.components(separatedBy: "## Tolerances").dropFirst().first
        else { return (.nan, .nan) }
        let bullets = section.components(separatedBy: "\n- ")
        guard let bullet = bullets.first(where: { $0.contains("UNet") && $0.contains("float32") }) else { return (.nan, .nan) }
        func number(after marker: String) -> Double {
            guard let r = bullet.range(of: marker) else { return .nan }
            let tail = bullet[r.upperBound...].drop(while: { $0 == " " })
            return Double(tail.prefix(while: { "0123456789.e-+".contains($0) })) ?? .nan
        }
        return (number(after: "≤"), number(after: "Use"))
    }()
}

/// Golden files listed by the fixture manifest.
enum Goldens {
    /// `variant/component` for every golden file named `component.safetensors` under a variant
    /// folder whose component is a model folder under `models/variant/` matching `kind`.
    static func cases(_ kind: (String) -> Bool) -> [String] {
        guard let manifest = try? Files.readJSON(Fixtures.reference("golden/manifest.json")), let files = manifest.members
        else { return [] }
        return files.map(\.0).compactMap { path -> String? in
            let parts = path.split(separator: "/")
            guard parts.count == 2, parts[1].hasSuffix(".safetensors") else { return nil }
            let component = String(parts[1].dropLast(".safetensors".count))
            guard kind(component), Files.isDirectory(Fixtures.reference("models/\(parts[0])/\(component)")) else { return nil }
            return "\(parts[0])/\(component)"
        }.sorted()
    }

    static func file(_ testCase: String) throws -> SafeTensorsFile {
        try SafeTensorsFile(path: Fixtures.reference("golden/\(testCase).safetensors"))
    }

    /// The model folder a golden case was computed from.
    static func modelFolder(_ testCase: String) -> String { Fixtures.reference("models/\(testCase)") }

    /// The only `.safetensors` weight file of a diffusers/transformers component folder.
    static func weights(in folder: String) throws -> SafeTensorsFile {
        let files = try Files.list(folder).filter { $0.hasSuffix(".safetensors") }
        guard files.count == 1 else { throw FileError(folder, "expected one .safetensors file, found \(files)") }
        return try SafeTensorsFile(path: Files.join(folder, files[0]))
    }
}

/// Max abs error against a reference, and the README's bound for it.
struct Comparison: CustomStringConvertible {
    let maxError: Double
    let refMax: Double
    let bound: Double
    var passes: Bool { maxError <= bound }
    var description: String { "max abs error \(maxError) (bound \(bound), max|ref| \(refMax))" }

    init(_ actual: Tensor, _ reference: Tensor, tolerance: Double) {
        let a = actual.toFloatArray(), r = reference.toFloatArray()
        var err = 0.0, m = 0.0
        for (x, y) in zip(a, r) {
            let d = abs(Double(x) - Double(y))
            err = max(err, d.isNaN ? .infinity : d)
            m = max(m, abs(Double(y)))
        }
        maxError = a.count == r.count ? err : .infinity
        refMax = m
        bound = tolerance * max(1, m)
    }
}

/// Expects `actual` to match `reference` (same shape, within tolerance), naming `what`.
func expectClose(_ actual: Tensor?, _ reference: Tensor, tolerance: Double, _ what: String,
                 sourceLocation: SourceLocation = #_sourceLocation) {
    guard let actual else {
        Issue.record("\(what): no output", sourceLocation: sourceLocation)
        return
    }
    #expect(actual.shape == reference.shape, "\(what): shape \(actual.shape) vs reference \(reference.shape)",
            sourceLocation: sourceLocation)
    let c = Comparison(actual, reference, tolerance: tolerance)
    #expect(c.passes, "\(what): \(c)", sourceLocation: sourceLocation)
}

/// Compiles and runs a graph with host tensors.
func run(_ graph: Graph, weights: TensorSource, on b: TestBackend, feeds: [String: Tensor]) throws -> [String: Tensor] {
    let exe = try b.backend.compile(graph, weights: ModelWeights(weights), options: b.options)
    return try exe.run(host: feeds, on: b.backend)
}

extension Tensor {
    /// A copy with every element mapped.
    func mapFloats(_ f: (Float) -> Float) -> Tensor {
        Tensor(shape: shape, floats: toFloatArray().map(f))
    }
}
