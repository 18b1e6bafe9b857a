import DiffuseCore
import DiffuseGraph

/// A declared weight of a model: its state-dict name and shape.
public typealias ParameterDeclaration = (name: String, shape: [Int])

/// What every network here shares: the weights it declares, by the diffusers/transformers
/// state-dict names, known from the config alone.
public protocol ModelComponent {
    /// The class name diffusers/transformers gives the model, for messages.
    static var className: String { get }
    /// Every parameter the model declares, in declaration order. One weight file holds them.
    var parameters: [ParameterDeclaration] { get }
    /// Whether a tensor of a checkpoint that the model does not declare is a known buffer
    /// that the reference implementation also skips silently (CLIP's `position_ids`).
    func isIgnoredBuffer(_ name: String) -> Bool
}

extension ModelComponent {
    public func isIgnoredBuffer(_ name: String) -> Bool { false }

    /// Total number of weights, as `sum(p.numel() for p in model.parameters())` counts them.
    public var parameterCount: Int { parameters.reduce(0) { $0 + $1.shape.reduce(1, *) } }

    /// Compares the declared parameters with a weight source: a missing or misshapen tensor, or
    /// one that is not floating point, is an error naming the tensor (and both shapes); tensors
    /// the model does not use are reported as a warning, as diffusers does, and returned. A model
    /// wrapped in a larger one (the safety checker's encoder) names the tensors the wrapper reads
    /// itself (`alsoReading`) and the wrapper's class for the warning (`owner`).
    @discardableResult
    public func checkWeights(_ source: TensorSource, alsoReading: Set<String> = [], owner: String = Self.className) throws -> [String] {
        try checkDeclaredWeights(source)
        let declared = Set(parameters.map(\.name)).union(alsoReading)
        let unused = source.tensorNames.filter { !declared.contains($0) && !isIgnoredBuffer($0) }
        if !unused.isEmpty {
            let shown = unused.prefix(8).joined(separator: ", ")
            let more = unused.count > 8 ? " and \(unused.count - 8) more" : ""
            Log.warning("\(source.origin): \(unused.count) tensor\(unused.count == 1 ? " is" : "s are") not used by \(owner): \(shown)\(more)")
        }
        return unused
    }

    /// The errors of `checkWeights` without its warning: for a check made before the weights are
    /// loaded (which then warns once).
    public func checkDeclaredWeights(_ source: TensorSource) throws {
        for (name, shape) in parameters {
            guard let info = source.info(name) else { throw WeightError.missing(tensor: name, origin: source.origin) }
            guard info.dtype.isFloatingPoint else {
                throw WeightError.notFloat(tensor: name, origin: source.origin, dtype: info.dtype)
            }
            guard info.shape == shape else {
                throw WeightError.shapeMismatch(tensor: name, origin: source.origin, file: info.shape, model: shape)
            }
        }
    }

    /// Seeded random weights of this architecture (for benchmarks without downloaded weights).
    public func randomWeights(seed: UInt64 = 0, dtype: DType = .float32) -> RandomWeights {
        RandomWeights(parameters: parameters, seed: seed, dtype: dtype)
    }
}

/// Builds a graph with `body` and finishes it; shape errors surface as one `GraphError`.
func buildGraph(_ body: (GraphBuilder) throws -> Void) throws -> Graph {
    let b = GraphBuilder()
    try body(b)
    return try b.finish()
}

/// Runs `body` once on a small probe input to learn the parameters a model declares, and checks
/// that the architecture builds at all (a bad channel/group combination fails here, when the
/// model is created, not at the first run).
func probeParameters(_ body: (GraphBuilder) throws -> Void) throws -> [ParameterDeclaration] {
    let b = GraphBuilder()
    try body(b)
    _ = try b.finish()
    return b.declaredParameters
}

/// What a pipeline needs of a VAE, full (`AutoencoderKL`) or tiny (`AutoencoderTiny`).
///
/// The decoder graph takes `latents` [B,latent_channels,h,w] as the pipeline hands them to
/// `vae.decode` (already `latents / scaling_factor + shift_factor`) and returns `sample`
/// [B,3,h*f,w*f] in about [-1, 1]. The encoder graph takes `sample` in [-1, 1]; its outputs
/// depend on the model (`mean`/`logvar` of the latent distribution, or `latents`).
public protocol ImageAutoencoder: ModelComponent {
    /// `f`: how many times larger images are than latents on each side.
    var spatialScaleFactor: Int { get }
    var latentChannels: Int { get }
    var scalingFactor: Double { get }
    var shiftFactor: Double { get }
    /// Whether diffusers runs this VAE in float32 inside a 16-bit pipeline.
    var forceUpcast: Bool { get }
    func decoderGraph(batch: Int, height: Int, width: Int) throws -> Graph
    func encoderGraph(batch: Int, height: Int, width: Int) throws -> Graph
    /// Per-channel statistics the latent space was normalised with (`latents_mean`,
    /// `latents_std`), which diffusers' SDXL pipelines apply around the scaling factor.
    var latentStatistics: (mean: [Double], std: [Double])? { get }
}

extension ImageAutoencoder {
    public var latentStatistics: (mean: [Double], std: [Double])? { nil }
}
