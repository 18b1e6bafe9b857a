import DiffuseCore
import Testing

/// Rules the sources keep that no compiler checks.
@Suite struct SourceRulesTests {
    /// The library and the command line import FoundationEssentials, never all of Foundation:
    /// full Foundation (ICU's data among it) triples the static binary the GPU machine is sent
    /// (about 21 MB stripped without it, 62 MB with), against a 64 MiB carry budget.
    @Test func noFullFoundation() throws {
        let root = String(#filePath.split(separator: "/").dropLast(3).joined(separator: "/"))
        let sources = "/" + root + "/Sources"
        var offenders: [String] = [], scanned = 0
        func walk(_ folder: String) throws {
            for name in try Files.list(folder) {
                let path = Files.join(folder, name)
                if Files.isDirectory(path) {
                    try walk(path)
                } else if name.hasSuffix(".swift") {
                    scanned += 1
                    let lines = try Files.readText(path).split(separator: "\n")
                    if lines.contains(where: { $0.trimmingPrefix(" ") == "import Foundation" || $0.hasPrefix("@preconcurrency import Foundation") }) {
                        offenders.append(path)
                    }
                }
            }
        }
        try walk(sources)
        #expect(scanned > 50, "\(sources): only \(scanned) Swift files")
        #expect(offenders.isEmpty, "import FoundationEssentials (or nothing) instead of Foundation in \(offenders)")
    }
}
