import DiffuseCore
import DiffuseGraph
import Testing
import DiffuseCUDA

/// Checks of the public API that need no GPU.
@Suite struct HostTests {
    /// Every self-test case builds a valid graph that the reference backend runs to finite,
    /// non-zero outputs (so a GPU check against it can fail).
    @Test(arguments: OpCases.all)
    func opCaseRunsOnReference(_ c: OpCase) throws {
        let out = try c.referenceOutputs()
        #expect(!out.isEmpty)
        for (name, t) in out {
            let v = t.toFloatArray()
            #expect(v.allSatisfy { $0.isFinite }, "\(c.name): output \(name) has non-finite values")
            #expect(v.contains { $0 != 0 }, "\(c.name): output \(name) is all zeros, so the check could not fail")
        }
    }

    @Test func caseNamesAreUnique() {
        let names = OpCases.all.map(\.name)
        #expect(Set(names).count == names.count)
    }

    /// Without a GPU the backend must fail with an error that names what is missing.
    @Test func initErrorNamesWhatIsMissing() {
        do {
            _ = try CUDABackend()
            print("a CUDA device is present: nothing to check here")
        } catch let e as CUDAError {
            let text = e.description
            #expect(text.contains("libcuda") || text.contains("device") || text.contains("driver")
                    || text.contains("libnvrtc") || text.contains("libcublasLt"), "unclear error: \(text)")
        } catch {
            Issue.record("unexpected error type: \(error)")
        }
    }
}
