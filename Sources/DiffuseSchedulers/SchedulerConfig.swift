import DiffuseCore

/// A `scheduler_config.json`, read with diffusers' `from_config` rules: each class reads the keys
/// its `__init__` takes, a key missing from the file (or listed in `_use_default_values`) means
/// that class's own default, not the default of the class that wrote the file, and unknown keys
/// are ignored. A value the class cannot handle is an error naming the key and the value.
public struct SchedulerConfig: Sendable {
    /// Where the config came from, for error messages.
    public let origin: String
    /// `_class_name`, the diffusers class that wrote the file.
    public let className: String?
    private var values: [String: JSON]
    /// Keys the file left to its class's defaults that a pipeline changed (see
    /// `fixedByStableDiffusionPipeline`): only the scheduler of the file's own class sees them.
    /// `Other.from_config(pipe.scheduler.config)` does not, because diffusers keeps such keys in
    /// `_use_default_values` and drops them, so the other class takes its own default.
    private var ownClassValues: [String: JSON] = [:]
    /// The keys read since this config was made or last overridden (by any class built from it).
    public private(set) var readKeys = KeyLog()

    /// A record of the config keys a scheduler read (shared by the copies of one config), so that
    /// a key given on the command line that the class never reads can be reported.
    public final class KeyLog: @unchecked Sendable {
        private let lock = NSLockLite()
        private var keys: Set<String> = []
        func record(_ key: String) { lock.withLock { _ = keys.insert(key) } }
        public var all: Set<String> { lock.withLock { keys } }
    }

    /// A config from a parsed JSON object.
    public init(json: JSON, origin: String = "scheduler config") throws {
        guard let members = json.members else {
            throw SchedulerError.invalidConfig(origin: origin, detail: "a scheduler config must be a JSON object")
        }
        self.origin = origin
        var values: [String: JSON] = [:]
        for (k, v) in members { values[k] = v }
        // Keys a saved config marks as defaults of the class that wrote it are not carried over.
        if let defaults = values["_use_default_values"]?.array {
            for key in defaults.compactMap(\.string) { values[key] = nil }
        }
        className = values["_class_name"]?.string
        self.values = values.filter { !$0.key.hasPrefix("_") }
    }

    /// A config from `key: value` pairs (tests, programmatic use).
    public init(_ values: [String: JSON], origin: String = "scheduler config") throws {
        try self.init(json: .object(values.sorted { $0.key < $1.key }), origin: origin)
    }

    /// Reads a `scheduler_config.json` file.
    public static func load(_ path: String) throws -> SchedulerConfig {
        let json: JSON
        do {
            json = try Files.readJSON(path)
        } catch let e as JSON.ParseError {
            throw SchedulerError.invalidConfig(origin: path, detail: "not valid JSON (\(e))")
        }
        return try SchedulerConfig(json: json, origin: path)
    }

    /// The same config with some keys replaced, like `Cls.from_config(config, **overrides)`.
    /// The overrides also win over what a pipeline fixed for the file's own class, and the copy
    /// starts a fresh record of the keys read.
    public func overriding(_ overrides: [String: JSON]) -> SchedulerConfig {
        var copy = self
        for (k, v) in overrides {
            copy.values[k] = v
            copy.ownClassValues[k] = nil
        }
        copy.readKeys = KeyLog()
        return copy
    }

    /// What `StableDiffusionPipeline.__init__` (SD 1.x/2.x; not SDXL's) does to an outdated
    /// scheduler config: `steps_offset` becomes 1 and a true `clip_sample` false, judged on the
    /// values the file's class sees, its defaults included (DDIM's `clip_sample` defaults to true,
    /// every class's `steps_offset` to 0). A key the file names is changed for every class built
    /// from it; a key it left to the default only for its own class.
    /// `StableDiffusionInpaintPipeline.__init__` (a folder whose model_index names it) sets
    /// `steps_offset` and a false `skip_prk_steps` (PNDM's default) instead, and leaves
    /// `clip_sample` as it is.
    public func fixedByStableDiffusionPipeline(inpainting: Bool = false) -> SchedulerConfig {
        var copy = self
        func fix(_ key: String, to value: JSON, ownDefault: JSON, when outdated: (JSON) -> Bool) {
            if let given = values[key] {
                if outdated(given) { copy.values[key] = value }
            } else if outdated(ownDefault) {
                copy.ownClassValues[key] = value
            }
        }
        fix("steps_offset", to: .number(1), ownDefault: .number(0)) { $0.int != 1 }
        if inpainting {
            fix("skip_prk_steps", to: .bool(true), ownDefault: .bool(className != "PNDMScheduler")) { $0.bool == false }
            return copy
        }
        let clipSampleDefault = ["DDIMScheduler", "DDPMScheduler"].contains(className ?? "")
        fix("clip_sample", to: .bool(false), ownDefault: .bool(clipSampleDefault)) { $0.bool == true }
        return copy
    }

    /// The config as the scheduler of the file's own class reads it: with the values a pipeline
    /// set for keys the file left to that class's defaults.
    var forOwnClass: SchedulerConfig {
        var copy = self
        for (k, v) in ownClassValues { copy.values[k] = v }
        copy.ownClassValues = [:]
        return copy
    }

    /// The raw value of a key, if present.
    public subscript(key: String) -> JSON? {
        readKeys.record(key)
        return values[key]
    }

    /// A typed view for one class, whose errors name that class.
    func reader(_ className: String) -> ConfigReader { ConfigReader(config: self, className: className) }
}

/// Reads typed values from a config for one scheduler class, with that class's defaults.
struct ConfigReader {
    let config: SchedulerConfig
    let className: String

    func invalid(_ key: String, _ value: String, _ expected: String) -> SchedulerError {
        .invalidValue(className: className, key: key, value: value, expected: expected, origin: config.origin)
    }

    private func invalid(_ key: String, _ value: JSON, _ expected: String) -> SchedulerError {
        invalid(key, value.description, expected)
    }

    func unsupported(_ key: String, _ value: String, supported: [String] = []) -> SchedulerError {
        .unsupportedValue(className: className, key: key, value: value, supported: supported, origin: config.origin)
    }

    func int(_ key: String, _ defaultValue: Int) throws -> Int {
        guard let v = config[key] else { return defaultValue }
        guard let i = v.int else { throw invalid(key, v, "an integer") }
        return i
    }

    func double(_ key: String, _ defaultValue: Double) throws -> Double {
        guard let v = config[key] else { return defaultValue }
        guard let d = v.double else { throw invalid(key, v, "a number") }
        return d
    }

    /// A number or null (diffusers' `Optional[float]`).
    func optionalDouble(_ key: String) throws -> Double? {
        guard let v = config[key], !v.isNull else { return nil }
        guard let d = v.double else { throw invalid(key, v, "a number or null") }
        return d
    }

    /// true/false; null reads as false, as Python's truthiness does in diffusers' `if config.x`.
    func bool(_ key: String, _ defaultValue: Bool) throws -> Bool {
        guard let v = config[key] else { return defaultValue }
        if v.isNull { return false }
        guard let b = v.bool else { throw invalid(key, v, "true or false") }
        return b
    }

    func string(_ key: String, _ defaultValue: String) throws -> String {
        guard let v = config[key] else { return defaultValue }
        guard let s = v.string else { throw invalid(key, v, "a string") }
        return s
    }

    func optionalString(_ key: String) throws -> String? {
        guard let v = config[key], !v.isNull else { return nil }
        guard let s = v.string else { throw invalid(key, v, "a string or null") }
        return s
    }

    /// One of an enum's raw values; `aliases` map legacy names diffusers accepts and rewrites.
    func choice<E: RawRepresentable & CaseIterable>(_ key: String, _ defaultValue: E, allowed: [E]? = nil,
                                                     aliases: [String: E] = [:]) throws -> E where E.RawValue == String {
        let name = try string(key, defaultValue.rawValue)
        let allowed = allowed ?? Array(E.allCases)
        if let v = E(rawValue: name) ?? aliases[name], allowed.contains(where: { $0.rawValue == v.rawValue }) { return v }
        throw unsupported(key, "\"\(name)\"", supported: allowed.map(\.rawValue))
    }

    /// A list of numbers or null.
    func doubles(_ key: String) throws -> [Double]? {
        guard let v = config[key], !v.isNull else { return nil }
        guard let a = v.array else { throw invalid(key, v, "a list of numbers or null") }
        return try a.map { item in
            guard let d = item.double else { throw invalid(key, v, "a list of numbers or null") }
            return d
        }
    }

    /// A list of integers or null.
    func ints(_ key: String) throws -> [Int]? {
        try doubles(key).map { list in
            try list.map { d in
                guard let i = JSON.number(d).int else { throw invalid(key, config[key]!, "a list of integers") }
                return i
            }
        }
    }

    /// Fails when a feature the class has, but this port does not implement, is switched on.
    func requireOff(_ key: String, because reason: String) throws {
        if try bool(key, false) {
            throw SchedulerError.unsupportedFeature(className: className, key: key, value: "true", reason: reason, origin: config.origin)
        }
    }

    /// Fails when an optional setting this port does not implement is set.
    func requireNull(_ key: String, because reason: String) throws {
        if let v = config[key], !v.isNull {
            throw SchedulerError.unsupportedFeature(className: className, key: key, value: v.description, reason: reason, origin: config.origin)
        }
    }
}
