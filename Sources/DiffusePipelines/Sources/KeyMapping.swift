import DiffuseCore

/// What happens to a tensor on its way from a checkpoint's name to the diffusers name. The
/// table says it in terms of the layers; `MappedTensorSource` turns it into a concrete
/// `TensorTransform` once the stored shape is known.
public enum LeafTransform: Equatable, Sendable {
    case identity
    /// A 1x1 convolution's weight `[O, I, 1, 1]` (or `[O, I, 1]`) read as a linear layer's `[O, I]`
    /// (the LDM VAE's attention projections). A weight already stored as `[O, I]` is taken as it is.
    case convToLinear
    /// Part `index` of `count` equal parts along the first axis (OpenCLIP's fused q/k/v).
    case chunk(Int, of: Int)
    /// A matrix transposed (OpenCLIP's `text_projection`).
    case transpose

    /// The concrete transform for a source tensor of `shape`, or nil when it does not apply.
    func concrete(for shape: [Int]) -> TensorTransform? {
        switch self {
        case .identity:
            return .identity
        case .convToLinear:
            guard shape.count >= 2, shape.dropFirst(2).allSatisfy({ $0 == 1 }) else { return nil }
            return shape.count == 2 ? .identity : .reshape(Array(shape.prefix(2)))
        case let .chunk(index, count):
            guard let rows = shape.first, rows % count == 0 else { return nil }
            let size = rows / count
            return .rows(index * size..<(index + 1) * size)
        case .transpose:
            return shape.count == 2 ? .transpose : nil
        }
    }
}

/// One renamed parameter below a module's prefix: `source` (an exact leaf like
/// `attn.in_proj_weight`, or a prefix ending in "." like `in_layers.0.`) becomes `target`.
public struct LeafRule: Equatable, Sendable {
    public let source: String
    public let target: String
    public let transform: LeafTransform

    public init(_ source: String, _ target: String, _ transform: LeafTransform = .identity) {
        self.source = source
        self.target = target
        self.transform = transform
    }

    func matches(source leaf: String) -> Bool { source.hasSuffix(".") ? leaf.hasPrefix(source) : leaf == source }
    func matches(target leaf: String) -> Bool { target.hasSuffix(".") ? leaf.hasPrefix(target) : leaf == target }
}

/// How the parameters of one kind of module are named in the checkpoint and in diffusers.
public struct LeafTable: Equatable, Sendable {
    public let rules: [LeafRule]
    /// Whether a leaf no rule names keeps its name (the VAE's resnets: only `nin_shortcut`
    /// changes) or is unknown (an LDM UNet resnet's leaves all change).
    public let passThrough: Bool

    public init(_ rules: [LeafRule], passThrough: Bool) {
        self.rules = rules
        self.passThrough = passThrough
    }

    /// Every name unchanged (transformer blocks, convolutions, norms).
    public static let identity = LeafTable([], passThrough: true)
}

/// One module: every checkpoint tensor under `source` is the diffusers tensor under `target`,
/// its leaf renamed by `leaves`. A rule whose `source` does not end in "." names one exact tensor.
public struct KeyRule: Equatable, Sendable {
    public let source: String
    public let target: String
    public let leaves: LeafTable
    /// For an exact rule: the transform of that one tensor.
    public let transform: LeafTransform

    public init(_ source: String, _ target: String, _ leaves: LeafTable = .identity) {
        self.source = source
        self.target = target
        self.leaves = leaves
        transform = .identity
    }

    public init(exact source: String, _ target: String, _ transform: LeafTransform = .identity) {
        self.source = source
        self.target = target
        self.leaves = .identity
        self.transform = transform
    }

    public var isExact: Bool { !source.hasSuffix(".") }
}

/// Checkpoint tensors a component knowingly leaves unused (diffusers skips them too).
public enum IgnoredKey: Equatable, Sendable {
    /// One exact name (relative to the component's prefix).
    case exact(String)
    /// `prefix<n>.…` for every layer index `n >= first` (SD 2's 24th OpenCLIP layer: diffusers'
    /// config has 23, because SD 2 conditions on the penultimate layer).
    case layers(prefix: String, from: Int)

    func matches(_ key: String) -> Bool {
        switch self {
        case .exact(let name): return key == name
        case let .layers(prefix, first):
            guard key.hasPrefix(prefix) else { return false }
            let rest = key.dropFirst(prefix.count)
            guard let dot = rest.firstIndex(of: "."), let n = Int(rest[..<dot]) else { return false }
            return n >= first
        }
    }
}

/// The key table of one component of a single-file checkpoint: where its tensors live in the
/// file (`sourcePrefix`), and, module by module, their diffusers names. The same table reads a
/// checkpoint (`targets(forSource:)`) and says where each diffusers tensor comes from
/// (`source(forTarget:)`, which the tests use to write checkpoints in the original layout).
public struct KeyMapping: Sendable {
    public let component: String
    public let sourcePrefix: String
    public let rules: [KeyRule]
    public let ignored: [IgnoredKey]

    private let prefixRules: [String: Int]
    private let exactRules: [String: Int]
    private let targetPrefixRules: [String: Int]
    private let targetExactRules: [String: Int]

    public init(component: String, sourcePrefix: String, rules: [KeyRule], ignored: [IgnoredKey] = []) {
        self.component = component
        self.sourcePrefix = sourcePrefix
        self.rules = rules
        self.ignored = ignored
        var p: [String: Int] = [:], e: [String: Int] = [:], tp: [String: Int] = [:], te: [String: Int] = [:]
        for (i, r) in rules.enumerated() {
            if r.isExact { e[r.source] = i; te[r.target] = i } else { p[r.source] = i; tp[r.target] = i }
        }
        prefixRules = p
        exactRules = e
        targetPrefixRules = tp
        targetExactRules = te
    }

    /// The rule for a name: an exact rule, else the one with the longest prefix (each prefix
    /// that ends at a "." is looked up).
    private static func lookup(_ name: String, exact: [String: Int], prefixes: [String: Int]) -> (rule: Int, rest: Substring)? {
        if let i = exact[name] { return (i, "") }
        var end = name.endIndex
        while let dot = name[..<end].lastIndex(of: ".") {
            let prefix = String(name[...dot])
            if let i = prefixes[prefix] { return (i, name[name.index(after: dot)...]) }
            end = dot
        }
        return nil
    }

    /// The diffusers names (more than one when a fused tensor is split) of a checkpoint tensor
    /// given relative to `sourcePrefix`; nil when no rule places it.
    public func targets(forSource key: String) -> [(name: String, transform: LeafTransform)]? {
        place(key)?.targets
    }

    /// The rule that places a checkpoint tensor, and its diffusers names.
    private func place(_ key: String) -> (rule: Int, targets: [(name: String, transform: LeafTransform)])? {
        guard let (i, rest) = Self.lookup(key, exact: exactRules, prefixes: prefixRules) else { return nil }
        let rule = rules[i]
        if rule.isExact { return (i, [(rule.target, rule.transform)]) }
        let leaf = String(rest)
        let matching = rule.leaves.rules.filter { $0.matches(source: leaf) }
        // The longest leaf match wins; leaves sharing a source (q, k, v of one fused tensor) all apply.
        if let longest = matching.map(\.source.count).max() {
            return (i, matching.filter { $0.source.count == longest }.map { lr in
                (rule.target + lr.target + leaf.dropFirst(lr.source.count), lr.transform)
            })
        }
        return rule.leaves.passThrough ? (i, [(rule.target + leaf, .identity)]) : nil
    }

    /// The checkpoint tensor (relative to `sourcePrefix`) that a diffusers tensor comes from,
    /// and how; nil when no rule produces that name.
    public func source(forTarget name: String) -> (name: String, transform: LeafTransform)? {
        guard let (i, rest) = Self.lookup(name, exact: targetExactRules, prefixes: targetPrefixRules) else { return nil }
        let rule = rules[i]
        if rule.isExact { return (rule.source, rule.transform) }
        let leaf = String(rest)
        let matching = rule.leaves.rules.filter { $0.matches(target: leaf) }
        if let best = matching.max(by: { $0.target.count < $1.target.count }) {
            return (rule.source + best.source + leaf.dropFirst(best.target.count), best.transform)
        }
        return rule.leaves.passThrough ? (rule.source + leaf, .identity) : nil
    }

    /// Whether a checkpoint tensor (relative to `sourcePrefix`) is one the component knowingly skips.
    public func isIgnored(_ key: String) -> Bool { ignored.contains { $0.matches(key) } }

    /// The view of `file` under diffusers' names. Every tensor under `sourcePrefix` must have a
    /// place (or be knowingly ignored), and every module of the table must be in the file;
    /// otherwise the checkpoint does not match the config, and the error says where.
    public func view(of file: TensorSource, origin: String, configOrigin: String) throws -> MappedTensorSource {
        var entries: [(name: String, entry: MappedTensorSource.Entry)] = []
        var unplaced: [String] = []
        var used = [Bool](repeating: false, count: rules.count)
        for key in file.tensorNames where key.hasPrefix(sourcePrefix) {
            let relative = String(key.dropFirst(sourcePrefix.count))
            guard let (rule, targets) = place(relative) else {
                if !isIgnored(relative) { unplaced.append(key) }
                continue
            }
            used[rule] = true
            let shape = file.info(key)?.shape ?? []
            for (name, leaf) in targets {
                guard let transform = leaf.concrete(for: shape) else {
                    throw ModelSourceError.checkpointLayout(
                        file: file.origin, detail: "tensor '\(key)' has shape \(shape), which cannot be read as '\(name)' of the \(component)")
                }
                entries.append((name, .init(source: key, transform: transform)))
            }
        }
        if !unplaced.isEmpty {
            let shown = unplaced.prefix(5).joined(separator: ", ")
            let more = unplaced.count > 5 ? " and \(unplaced.count - 5) more" : ""
            throw ModelSourceError.checkpointLayout(
                file: file.origin, detail: "the \(component) does not match its config \(configOrigin): \(shown)\(more) have no place in it "
                    + "(a different architecture? give the matching configs with a config folder)")
        }
        if let missing = rules.indices.first(where: { !used[$0] }) {
            let rule = rules[missing]
            let what = rule.isExact ? "'\(sourcePrefix)\(rule.source)'" : "'\(sourcePrefix)\(rule.source)*'"
            throw ModelSourceError.checkpointLayout(
                file: file.origin, detail: "has no \(what), which the \(component) of config \(configOrigin) needs for '\(rule.target)'"
                    + (rule.isExact ? "" : "*") + " (a different architecture, or a damaged checkpoint?)")
        }
        return try MappedTensorSource(base: file, entries: entries, origin: origin)
    }
}

extension TensorSource {
    /// The numbers N of the tensors named `prefix` N `.…`, sorted: a Sequential's or a
    /// ModuleList's indices (`input_blocks.`, `input_hint_block.`, taesd.py's `encoder.`).
    func indices(under prefix: String) -> [Int] {
        Set(tensorNames.compactMap { name -> Int? in
            guard name.hasPrefix(prefix) else { return nil }
            return Int(name.dropFirst(prefix.count).prefix { $0 != "." })
        }).sorted()
    }
}
