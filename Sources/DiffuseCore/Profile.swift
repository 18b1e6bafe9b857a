#if canImport(Glibc)
import Glibc
#endif

/// `DIFFUSE_PROFILE=1`: every backend times each step of every run (the CPU with a clock, CUDA
/// with events and without graph capture) and the totals by label are printed at exit.
public enum Profile {
    public static let enabled = Files.environment("DIFFUSE_PROFILE") == "1"
    nonisolated(unsafe) static var totals: [String: (seconds: Double, count: Int)] = [:]
    nonisolated(unsafe) static var registered = false
    static let lock = NSLockLite()

    public static func add(_ label: String, _ seconds: Double) {
        lock.lock()
        defer { lock.unlock() }
        if !registered {
            registered = true
            atexit { Profile.report() }
        }
        let t = totals[label] ?? (0, 0)
        totals[label] = (t.seconds + seconds, t.count + 1)
    }

    static func report() {
        let all = totals.values.reduce(0) { $0 + $1.seconds }
        Log.printError("profile (all runs): \((all * 1000).rounded() / 1000) s")
        for (label, t) in totals.sorted(by: { $0.value.seconds > $1.value.seconds }) {
            let pct = (t.seconds / all * 1000).rounded() / 10
            let name = label.count >= 52 ? label : label + String(repeating: " ", count: 52 - label.count)
            Log.printError("  \(name) \((t.seconds * 10000).rounded() / 10000) s  \(pct)%  (\(t.count) runs)")
        }
    }
}
