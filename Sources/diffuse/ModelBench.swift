import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffusePipelines
#if canImport(Glibc)
import Glibc
#endif

/// Model benchmarks: one component (or the whole pipeline) of a real architecture with seeded
/// random weights (or a real model), timed under each setup — each optimization of the seed
/// documents as a switch — against the plain float32 baseline, with peak memory and the
/// output's error against the baseline. Rows follow the schema of the diffusers peer scripts
/// (`shared/bench/bench_diffusers_*.py`).
struct ModelBench {
    struct Setup {
        var name: String
        var options: PipelineOptions
        /// Graph passes applied before compiling (fused QKV, int8 quantization).
        var passes: [(Graph) -> Graph] = []
        /// Component-level choices.
        var tinyVAE = false
        var note = ""
    }

    struct Row {
        var setup: String
        var component: String
        var architecture: String
        var size: String
        var batch: Int
        var times: [Double]
        var flops: Double?
        var peakRSS: Int
        var peakDevice: Int?
        var maxRelErr: Float?
        var note: String

        var median: Double { times.sorted()[times.count / 2] }

        var json: JSON {
            var m: [(String, JSON)] = [
                ("setup", .string(setup)), ("component", .string(component)), ("architecture", .string(architecture)),
                ("size", .string(size)), ("batch", .number(Double(batch))),
                ("median_s", .number(median)), ("min_s", .number(times.min()!)), ("max_s", .number(times.max()!)),
                ("gflops", flops.map { .number(($0 / median / 1e9 * 10).rounded() / 10) } ?? .null),
                ("peak_rss_mb", .number(Double(peakRSS / (1 << 20)))),
                ("max_rel_err", maxRelErr.map { .number(Double($0)) } ?? .null),
            ]
            if let d = peakDevice { m.append(("peak_gpu_mb", .number(Double(d / (1 << 20))))) }
            if !note.isEmpty { m.append(("note", .string(note))) }
            return .object(m)
        }
    }

    /// Resets the kernel's peak-RSS counter (VmHWM) so each setup reports its own peak.
    static func resetPeakRSS() {
        let fd = open("/proc/self/clear_refs", O_WRONLY)
        if fd >= 0 { _ = write(fd, "5", 1); close(fd) }
    }

    static func relativeError(_ a: Tensor, _ b: Tensor) -> Float {
        let x = a.toFloatArray(), y = b.toFloatArray()
        var err: Float = 0, m: Float = 0
        for i in y.indices { err = max(err, abs(x[i] - y[i])); m = max(m, abs(y[i])) }
        return err / max(m, 1e-12)
    }
}
