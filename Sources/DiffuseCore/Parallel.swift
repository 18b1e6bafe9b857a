import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// Work split across the machine's cores. `DispatchQueue.concurrentPerform` costs about 0.5 µs
/// a call here (a task group ~25 µs), so kernels can parallelize even small loops.
public enum Parallel {
    /// Number of worker threads (the `DIFFUSE_THREADS` variable, else the online cores).
    public static let threads: Int = {
        if let s = Files.environment("DIFFUSE_THREADS"), let n = Int(s), n > 0 { return n }
        return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }()

    /// Runs `body(i)` for i in 0..<count, spread over the threads. Runs inline when count is 1.
    @inlinable
    public static func forEach(_ count: Int, _ body: (Int) -> Void) {
        if count <= 0 { return }
        if count == 1 || threads == 1 {
            for i in 0..<count { body(i) }
            return
        }
        DispatchQueue.concurrentPerform(iterations: count, execute: body)
    }

    /// Splits 0..<total into about `threads * 4` contiguous chunks (at least `grain` each) and
    /// runs `body(range)` on each in parallel.
    @inlinable
    public static func chunks(_ total: Int, grain: Int = 1, _ body: (Range<Int>) -> Void) {
        if total <= 0 { return }
        let maxChunks = max(1, total / max(grain, 1))
        let n = min(maxChunks, threads == 1 ? 1 : threads * 4)
        if n <= 1 { body(0..<total); return }
        let step = (total + n - 1) / n
        let count = (total + step - 1) / step
        forEach(count) { c in
            let lo = c * step
            body(lo..<min(total, lo + step))
        }
    }
}
