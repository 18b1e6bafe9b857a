#if canImport(Glibc)
import Glibc
#endif

/// Messages for the user on stderr. Warnings can be captured (tests, servers) by a handler.
public enum Log {
    nonisolated(unsafe) public static var warningHandler: ((String) -> Void)? = nil
    nonisolated(unsafe) public static var quiet = false

    public static func warning(_ message: String) {
        if let h = warningHandler { h(message); return }
        if !quiet { printError("warning: \(message)") }
    }

    public static func info(_ message: String) {
        if !quiet { printError(message) }
    }

    public static func printError(_ s: String, terminator: String = "\n") {
        fputs(s + terminator, stderr)
        fflush(stderr)
    }
}

/// Monotonic wall-clock time in seconds.
public func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// Peak resident set size of this process in bytes (VmHWM), or 0 if unknown.
public func peakResidentBytes() -> Int {
    guard let text = try? Files.readText("/proc/self/status") else { return 0 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmHWM:") {
        let kb = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { Int($0) }.first ?? 0
        return kb * 1024
    }
    return 0
}

/// Current resident set size in bytes (VmRSS), or 0 if unknown.
public func residentBytes() -> Int {
    guard let text = try? Files.readText("/proc/self/status") else { return 0 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let kb = line.split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap { Int($0) }.first ?? 0
        return kb * 1024
    }
    return 0
}

/// Hands the heap's free pages back to the kernel. glibc raises its mmap threshold after each
/// large free, so the memory of released weights lands in the heap and stays resident; this is
/// called after a component is released so that "low memory" lowers the RSS.
public func returnFreedMemory() {
    #if canImport(Glibc)
    _ = glibcMallocTrim(0)
    #endif
}

#if canImport(Glibc)
@_silgen_name("malloc_trim")
private func glibcMallocTrim(_ pad: Int) -> Int32
#endif
