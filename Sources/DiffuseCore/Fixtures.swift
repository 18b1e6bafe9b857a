/// Where the reference fixtures and shared data live. Tests and benchmarks read every case
/// from these folders, so they run unchanged against any fixture set of the same layout.
public enum Fixtures {
    /// `DIFFUSE_REFERENCE`, default `../shared/reference` (relative to the working directory).
    public static var reference: String { Files.environment("DIFFUSE_REFERENCE") ?? "../shared/reference" }
    /// `DIFFUSE_DATA`, default `../shared/data`.
    public static var data: String { Files.environment("DIFFUSE_DATA") ?? "../shared/data" }

    public static func reference(_ relative: String) -> String { Files.join(reference, relative) }
    public static func data(_ relative: String) -> String { Files.join(data, relative) }
}
