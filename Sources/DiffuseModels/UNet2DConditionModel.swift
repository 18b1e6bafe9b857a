import DiffuseCore
import DiffuseGraph

/// diffusers' `UNet2DConditionModel`: the denoiser of SD 1.x/2.x, SDXL (text_time added
/// conditioning) and the BK-SDM distilled UNets (no mid block).
///
/// Graph inputs: `sample` [B,in_channels,h,w], `timestep` [B] (float32, one per sample; the
/// caller broadcasts a scalar), `encoder_hidden_states` [B,S,cross_attention_dim]; with
/// `addition_embed_type: "text_time"` also `text_embeds` [B,D] and `time_ids` [B,N]; with
/// `time_cond_proj_dim` also `timestep_cond` [B,time_cond_proj_dim]; with `num_class_embeds`
/// also `class_labels` [B] (int32: the x4 upscaler's noise level). Output: `noise_pred`.
public struct UNet2DConditionModel: ModelComponent, Sendable {
    public static let className = "UNet2DConditionModel"

    /// Graph input and output names.
    public enum Name {
        public static let sample = "sample"
        public static let timestep = "timestep"
        public static let encoderHiddenStates = "encoder_hidden_states"
        public static let textEmbeds = "text_embeds"
        public static let timeIds = "time_ids"
        public static let timestepCond = "timestep_cond"
        public static let classLabels = "class_labels"
        public static let noisePred = "noise_pred"
    }

    public let config: Configuration
    public let parameters: [ParameterDeclaration]

    /// Builds the model description, rejecting any config value the engine does not run.
    public init(config: Configuration) throws {
        try config.validate()
        self.config = config
        parameters = try probeParameters { b in
            let c = config
            let p = Params(b)
            // The deepest level is 1x1, or 2x2 for the K-UNet (whose resampling reflects at the edges).
            let batch = 1, size = 1 << max(0, c.downBlockTypes.count - (c.isKUNet ? 0 : 1))
            let inputs = Inputs(
                sample: b.input(Name.sample, shape: [batch, c.inChannels, size, size]),
                timestep: b.input(Name.timestep, shape: [batch]),
                encoderHiddenStates: b.input(Name.encoderHiddenStates, shape: [batch, 1, c.crossAttentionDims[0]]),
                textEmbeds: c.additionEmbedType == "text_time"
                    ? b.input(Name.textEmbeds, shape: [batch, c.textEmbedsDim(timeIds: 6)]) : nil,
                timeIds: c.additionEmbedType == "text_time" ? b.input(Name.timeIds, shape: [batch, 6]) : nil,
                timestepCond: c.timeCondProjDim.map { b.input(Name.timestepCond, shape: [batch, $0]) })
            var withClasses = inputs
            withClasses.classLabels = c.classLabelsInput(b, batch: batch)
            b.output(Name.noisePred, Self.forward(p, c, withClasses))
        }
    }

    /// Reads `config.json`.
    public init(configPath: String) throws {
        try self.init(config: loadConfiguration(Configuration.self, from: configPath))
    }

    /// Number of 2x upsamplers (the latent size is best a multiple of 2^this; other sizes work
    /// as in diffusers, by cropping the upsampled maps to the skips).
    public var numUpsamplers: Int { config.blockOutChannels.count - 1 }

    /// Whether the model takes `text_embeds` and `time_ids` (SDXL).
    public var usesTextTimeConditioning: Bool { config.additionEmbedType == "text_time" }

    /// The `timestep_cond` feed for a call without one (diffusers' `timestep_cond=None`, which
    /// skips `cond_proj`): zeros, since `cond_proj` has no bias. nil when the UNet takes none.
    public func absentTimestepCond(batch: Int) -> Tensor? {
        config.timeCondProjDim.map { Tensor(zeros: [batch, $0]) }
    }

    /// The forward graph for one input shape. `timeIds` is the number of SDXL micro-conditioning
    /// values per sample (6 for the base model, 5 for the refiner); `text_embeds` gets the rest
    /// of `projection_class_embeddings_input_dim`.
    public func graph(batch: Int, height: Int, width: Int, sequenceLength: Int, timeIds: Int = 6) throws -> Graph {
        let c = config
        if usesTextTimeConditioning {
            let d = c.textEmbedsDim(timeIds: timeIds)
            guard d > 0 else {
                throw GraphError(scope: "", message: "projection_class_embeddings_input_dim \(c.projectionClassEmbeddingsInputDim ?? 0) leaves no room for text_embeds next to \(timeIds) time ids of \(c.additionTimeEmbedDim ?? 0) channels")
            }
        }
        return try buildGraph { b in
            let inputs = Inputs(
                sample: b.input(Name.sample, shape: [batch, c.inChannels, height, width]),
                timestep: b.input(Name.timestep, shape: [batch]),
                encoderHiddenStates: b.input(Name.encoderHiddenStates, shape: [batch, sequenceLength, c.crossAttentionDims[0]]),
                textEmbeds: usesTextTimeConditioning
                    ? b.input(Name.textEmbeds, shape: [batch, c.textEmbedsDim(timeIds: timeIds)]) : nil,
                timeIds: usesTextTimeConditioning ? b.input(Name.timeIds, shape: [batch, timeIds]) : nil,
                timestepCond: c.timeCondProjDim.map { b.input(Name.timestepCond, shape: [batch, $0]) })
            var withClasses = inputs
            withClasses.classLabels = c.classLabelsInput(b, batch: batch)
            b.output(Name.noisePred, Self.forward(Params(b), c, withClasses))
        }
    }

    /// Symbolic inputs of the forward pass, for composing the UNet into a larger graph.
    public struct Inputs {
        public var sample: Value
        public var timestep: Value
        public var encoderHiddenStates: Value
        public var textEmbeds: Value?
        public var timeIds: Value?
        public var timestepCond: Value?
        /// Class labels [B] (int32) for a UNet with `num_class_embeds`; for `class_embed_type`
        /// "projection" the vectors [B, projection_class_embeddings_input_dim] it projects.
        public var classLabels: Value?
        /// A ControlNet's residuals (diffusers' `down_block_additional_residuals` and
        /// `mid_block_additional_residual`), added to the skips and to the mid block's output.
        public var downBlockAdditionalResiduals: [Value]?
        public var midBlockAdditionalResidual: Value?
        /// T2I-Adapters' features (diffusers' `down_intrablock_additional_residuals`), one per
        /// down block in order: added inside a cross-attention block to its last attention's
        /// output, after a plain block to its output (which is also its last skip); one left
        /// over joins the mid block's output when its shape matches (SDXL's adapters).
        public var downIntrablockAdditionalResiduals: [Value] = []
        /// IP-Adapters' image tokens, attended to beside the prompt by every cross-attention
        /// layer (diffusers' `encoder_hid_proj` output with `IPAdapterAttnProcessor2_0`).
        public var ipAdapters: [IPAdapterTokens] = []
        /// FreeU in the up blocks (diffusers' `enable_freeu`); nil is off.
        public var freeU: FreeU?
        /// Perturbed-attention guidance's identity attention in the layers it names (diffusers'
        /// PAG processors); nil is off.
        public var perturbedAttention: PerturbedAttention?

        public init(sample: Value, timestep: Value, encoderHiddenStates: Value, textEmbeds: Value? = nil,
                    timeIds: Value? = nil, timestepCond: Value? = nil) {
            self.sample = sample
            self.timestep = timestep
            self.encoderHiddenStates = encoderHiddenStates
            self.textEmbeds = textEmbeds
            self.timeIds = timeIds
            self.timestepCond = timestepCond
        }
    }

    /// Emits the forward pass with weights named under `p`; returns the predicted noise.
    public func callAsFunction(_ p: Params, _ inputs: Inputs) -> Value { Self.forward(p, config, inputs) }

    static func forward(_ p: Params, _ c: Configuration, _ inputs: Inputs) -> Value {
        // 1. time, 2. pre-process
        let emb = embedding(p, c, inputs)
        var sample = preProcess(p, c, inputs.sample)
        if c.isKUNet { return kForward(p, c, sample, encoderHiddenStates: inputs.encoderHiddenStates, emb: emb) }

        let channels = c.blockOutChannels
        let layers = c.layersPerDownBlock, transformerLayers = c.transformerLayersPerDownBlock
        let resnet = c.resnetSettings

        // 3. down, 4. mid (with a ControlNet's residuals)
        var skips: [Value]
        let context = CrossAttentionContext(encoderHiddenStates: inputs.encoderHiddenStates, ipAdapters: inputs.ipAdapters,
                                            perturbedAttention: inputs.perturbedAttention)
        (sample, skips) = downAndMid(p, c, sample, emb: emb, context: context,
                                     adapterResiduals: inputs.downIntrablockAdditionalResiduals)
        if let residuals = inputs.downBlockAdditionalResiduals {
            if residuals.count == skips.count {
                skips = zip(skips, residuals).map { $0 + $1 }
            } else {
                p.builder.fail("\(residuals.count) ControlNet residuals for the UNet's \(skips.count) skip connections")
            }
        }
        if let residual = inputs.midBlockAdditionalResidual { sample = sample + residual }

        // 5. up
        let reversedChannels = Array(channels.reversed())
        let reversedHeads = Array(c.numAttentionHeadsPerBlock.reversed())
        let reversedLayers = Array(layers.reversed())
        let reversedCross = Array(c.crossAttentionDims.reversed())
        let reversedTransformerLayers = Array(transformerLayers.reversed())
        var outputChannel = reversedChannels[0]
        for (i, type) in c.upBlockTypes.enumerated() {
            let isFinal = i == channels.count - 1
            let prevOutputChannel = outputChannel
            outputChannel = reversedChannels[i]
            let inputChannel = reversedChannels[min(i + 1, channels.count - 1)]
            let bp = p["up_blocks"][i]
            let numLayers = reversedLayers[i] + 1
            // Where this block's upsampler must land: the spatial size of the next skip.
            let next = skips.count > numLayers ? skips[skips.count - numLayers - 1] : nil
            let upsampleSize = isFinal ? nil : next.map { ($0.shape[2], $0.shape[3]) }
            if Configuration.blockName(type) == "CrossAttnUpBlock2D" {
                let settings = CrossAttentionSettings(
                    numAttentionHeads: reversedHeads[i], transformerLayers: reversedTransformerLayers[i],
                    crossAttentionDim: reversedCross[i], useLinearProjection: c.useLinearProjection,
                    upcastAttention: c.upcastAttention, onlyCrossAttention: c.onlyCrossAttentionPerBlock.reversed()[i])
                let block = CrossAttnUpBlock2D(bp, numLayers: numLayers, inChannels: inputChannel, outChannels: outputChannel,
                                               prevOutputChannel: prevOutputChannel, resnet: resnet, attention: settings,
                                               addUpsample: !isFinal)
                sample = block(sample, skips: &skips, temb: emb, context: context, upsampleSize: upsampleSize,
                               freeU: inputs.freeU.map { ($0, i) })
            } else {
                let block = UpBlock2D(bp, numLayers: numLayers, inChannels: inputChannel, outChannels: outputChannel,
                                      prevOutputChannel: prevOutputChannel, resnet: resnet, addUpsample: !isFinal)
                sample = block(sample, skips: &skips, temb: emb, upsampleSize: upsampleSize, freeU: inputs.freeU.map { ($0, i) })
            }
        }

        return postProcess(p, c, sample)
    }

    /// 2. pre-process: `conv_in`, after mapping [0, 1] to [-1, 1] where `center_input_sample` says so.
    static func preProcess(_ p: Params, _ c: Configuration, _ x: Value) -> Value {
        let sample = c.centerInputSample ? x.affine(scale: 2, shift: -1) : x
        let convIn = Conv2d(p["conv_in"], c.inChannels, c.blockOutChannels[0], kernel: c.convInKernel, padding: (c.convInKernel - 1) / 2)
        return p["conv_in"].scope { convIn(sample) }
    }

    /// 6. post-process: `conv_out(act(conv_norm_out(x)))`, without the norm and activation where
    /// `norm_num_groups` is null (the K-UNet).
    static func postProcess(_ p: Params, _ c: Configuration, _ x: Value) -> Value {
        var sample = x
        let channels = c.blockOutChannels
        if let groups = c.normNumGroups {
            let normOut = GroupNorm(p["conv_norm_out"], groups: groups, channels: channels[0], eps: Float(c.normEps))
            sample = p["conv_norm_out"].scope { normOut(sample).unary(DiffusersActivation.unary(c.actFn)!) }
        }
        let convOut = Conv2d(p["conv_out"], channels[0], c.outChannels, kernel: c.convOutKernel,
                             padding: (c.convOutKernel - 1) / 2)
        return p["conv_out"].scope { convOut(sample) }
    }

    /// The K-UNet (stabilityai/sd-x2-latent-upscaler's, see KUNetBlocks.swift): K blocks, no mid
    /// block. As in diffusers, the skips are the conv_in output and every down resnet's (none for
    /// the deepest block), each up block joins the last of its share, and the up blocks take the
    /// head width of `attention_head_dim` in the down blocks' order.
    static func kForward(_ p: Params, _ c: Configuration, _ convInOutput: Value, encoderHiddenStates context: Value, emb: Value) -> Value {
        let channels = c.blockOutChannels, layers = c.layersPerDownBlock
        let headDims = c.attentionHeadDim.perBlock(channels.count)
        let settings = KBlockSettings(tembChannels: c.timeEmbedDim, eps: c.normEps, act: DiffusersActivation.unary(c.actFn)!,
                                      crossAttentionDim: c.crossAttentionDims[0])
        var sample = convInOutput

        var skips: [Value?] = [sample]
        var outputChannel = channels[0]
        for (i, type) in c.downBlockTypes.enumerated() {
            let inputChannel = outputChannel
            outputChannel = channels[i]
            let block = KDownBlock2D(p["down_blocks"][i], numLayers: layers[i], inChannels: inputChannel, outChannels: outputChannel,
                                     settings: settings, crossAttention: type == "KCrossAttnDownBlock2D",
                                     attentionHeadDim: headDims[i], addDownsample: i != channels.count - 1)
            let (h, outputs) = block(sample, temb: emb, encoderHiddenStates: context)
            sample = h
            skips += outputs
        }

        let reversedChannels = Array(channels.reversed()), reversedLayers = Array(layers.reversed())
        for (i, type) in c.upBlockTypes.enumerated() {
            let block = KUpBlock2D(p["up_blocks"][i], numLayers: reversedLayers[i] + 1,
                                   inChannels: reversedChannels[min(i + 1, channels.count - 1)], outChannels: reversedChannels[i],
                                   settings: settings, crossAttention: type == "KCrossAttnUpBlock2D",
                                   attentionHeadDim: headDims[i], addUpsample: i != channels.count - 1)
            sample = block(sample, skips: &skips, temb: emb, encoderHiddenStates: context)
        }
        return postProcess(p, c, sample)
    }

    /// The time embedding, with SDXL's text_time addition (shared with the ControlNet).
    static func embedding(_ p: Params, _ c: Configuration, _ inputs: Inputs) -> Value {
        let act = DiffusersActivation.unary(c.actFn)!
        let channels = c.blockOutChannels
        let timeEmbedDim = c.timeEmbedDim
        let projected: Value, projectedWidth: Int
        if c.timeEmbeddingType == "fourier" {
            let fourier = GaussianFourierProjection(p["time_proj"], embeddingSize: timeEmbedDim / 2, flipSinToCos: c.flipSinToCos)
            (projected, projectedWidth) = (fourier(inputs.timestep), timeEmbedDim)
        } else {
            let timeProj = Timesteps(numChannels: channels[0], flipSinToCos: c.flipSinToCos, downscaleFreqShift: c.freqShift)
            (projected, projectedWidth) = (timeProj(inputs.timestep), channels[0])
        }
        let timeEmbedding = TimestepEmbedding(p["time_embedding"], inChannels: projectedWidth, timeEmbedDim: timeEmbedDim,
                                              act: act, postAct: c.timestepPostAct.flatMap(DiffusersActivation.unary),
                                              condProjDim: c.timeCondProjDim)
        var emb = timeEmbedding(projected, condition: inputs.timestepCond)
        if let classes = c.numClassEmbeds {
            // diffusers' class embedding (the x4 upscaler's noise level): a row per label, added.
            guard let labels = inputs.classLabels else {
                p.builder.fail("num_class_embeds \(classes): the UNet needs the class_labels input")
                return inputs.sample
            }
            emb = emb + Embedding(p["class_embedding"], count: classes, dim: timeEmbedDim)(labels)
        } else if c.classEmbedType == "projection", let dim = c.projectionClassEmbeddingsInputDim {
            // Stable unCLIP's noised image embedding: a TimestepEmbedding of the vectors as given, added.
            guard let labels = inputs.classLabels else {
                p.builder.fail("class_embed_type \"projection\": the UNet needs the class_labels input")
                return inputs.sample
            }
            emb = emb + TimestepEmbedding(p["class_embedding"], inChannels: dim, timeEmbedDim: timeEmbedDim)(labels)
        }
        if c.additionEmbedType == "text_time" {
            guard let textEmbeds = inputs.textEmbeds, let timeIds = inputs.timeIds else {
                p.builder.fail("addition_embed_type \"text_time\" needs the text_embeds and time_ids inputs")
                return inputs.sample
            }
            let addTimeProj = Timesteps(numChannels: c.additionTimeEmbedDim!, flipSinToCos: c.flipSinToCos,
                                        downscaleFreqShift: c.freqShift)
            let addEmbedding = TimestepEmbedding(p["add_embedding"], inChannels: c.projectionClassEmbeddingsInputDim!,
                                                 timeEmbedDim: timeEmbedDim)
            let batch = textEmbeds.shape[0]
            let timeEmbeds = addTimeProj(timeIds.reshape([-1])).reshape([batch, -1])
            emb = emb + addEmbedding(Value.concat([textEmbeds, timeEmbeds], axis: -1))
        }
        if let name = c.timeEmbeddingActFn, let a = DiffusersActivation.unary(name) { emb = emb.unary(a) }

        return emb
    }

    /// The down blocks and the mid block from the conv_in output; returns the mid block's
    /// output and the skips (the conv_in output first). The ControlNet's encoder is this half.
    static func downAndMid(_ p: Params, _ c: Configuration, _ input: Value, emb: Value,
                           context: CrossAttentionContext, adapterResiduals: [Value] = []) -> (Value, [Value]) {
        let heads = c.numAttentionHeadsPerBlock, crossDims = c.crossAttentionDims
        let layers = c.layersPerDownBlock, transformerLayers = c.transformerLayersPerDownBlock
        let channels = c.blockOutChannels
        let resnet = c.resnetSettings
        func attention(_ i: Int, layers: Int, onlyCross: Bool) -> CrossAttentionSettings {
            CrossAttentionSettings(numAttentionHeads: heads[i], transformerLayers: layers, crossAttentionDim: crossDims[i],
                                   useLinearProjection: c.useLinearProjection, upcastAttention: c.upcastAttention,
                                   onlyCrossAttention: onlyCross)
        }

        var sample = input
        // diffusers pops the adapter's features one per down block, in order.
        var adapter = adapterResiduals[...]
        func adapterResidual(for block: Int, shape: [Int]) -> Value? {
            guard let r = adapter.popFirst() else { return nil }
            guard r.shape == shape else {
                p.builder.fail("T2I-Adapter feature \(adapterResiduals.count - adapter.count - 1) has shape \(r.shape) but down block \(block) "
                               + "of the UNet gives \(shape): the adapter was not made for this UNet")
                return nil
            }
            return r
        }
        // 3. down
        var skips = [sample]
        var outputChannel = channels[0]
        for (i, crossAttention) in c.downBlocksHaveCrossAttention.enumerated() {
            let inputChannel = outputChannel
            outputChannel = channels[i]
            let isFinal = i == channels.count - 1
            let bp = p["down_blocks"][i]
            var out: (Value, [Value])
            if crossAttention {
                let block = CrossAttnDownBlock2D(bp, numLayers: layers[i], inChannels: inputChannel, outChannels: outputChannel,
                                                 resnet: resnet,
                                                 attention: attention(i, layers: transformerLayers[i], onlyCross: c.onlyCrossAttentionPerBlock[i]),
                                                 addDownsample: !isFinal, downsamplePadding: c.downsamplePadding)
                // The feature meets the block's last attention output: its shape is the block's width at its input size.
                let residual = adapterResidual(for: i, shape: [sample.shape[0], outputChannel, sample.shape[2], sample.shape[3]])
                out = block(sample, temb: emb, context: context, additionalResidual: residual)
                sample = out.0
            } else {
                let block = DownBlock2D(bp, numLayers: layers[i], inChannels: inputChannel, outChannels: outputChannel,
                                        resnet: resnet, addDownsample: !isFinal, downsamplePadding: c.downsamplePadding)
                out = block(sample, temb: emb)
                sample = out.0
                // diffusers adds in place (`sample += …`) to the tensor that is also the block's
                // last skip connection, so the skip gets the feature too.
                if let residual = adapterResidual(for: i, shape: sample.shape) {
                    sample = sample + residual
                    out.1[out.1.count - 1] = sample
                }
            }
            skips += out.1
        }

        // 4. mid
        if c.midBlockType != nil {
            var midResnet = resnet
            midResnet.outputScaleFactor = c.midBlockScaleFactor
            let mid = UNetMidBlock2DCrossAttn(p["mid_block"], inChannels: channels.last!, resnet: midResnet,
                                              attention: attention(channels.count - 1, layers: transformerLayers.last!,
                                                                   onlyCross: false))
            sample = mid(sample, temb: emb, context: context)
            if let residual = adapter.first, residual.shape == sample.shape { sample = sample + residual }
        }

        return (sample, skips)
    }
}

extension UNet2DConditionModel {
    /// `unet/config.json`. Keys are diffusers' names; a missing key takes diffusers' default.
    public struct Configuration: Codable, Sendable {
        public var sampleSize: IntOrList?
        public var inChannels: Int
        public var outChannels: Int
        public var centerInputSample: Bool
        public var flipSinToCos: Bool
        public var freqShift: Double
        public var downBlockTypes: [String]
        /// nil (JSON null) means no mid block (BK-SDM); a missing key means the default.
        public var midBlockType: String?
        public var upBlockTypes: [String]
        public var onlyCrossAttention: BoolOrList
        public var blockOutChannels: [Int]
        public var layersPerBlock: IntOrList
        public var downsamplePadding: Int
        public var midBlockScaleFactor: Double
        public var dropout: Double
        public var actFn: String
        public var normNumGroups: Int?
        public var normEps: Double
        public var crossAttentionDim: IntOrList
        public var transformerLayersPerBlock: IntOrList
        public var reverseTransformerLayersPerBlock: [[Int]]?
        public var encoderHidDim: Int?
        public var encoderHidDimType: String?
        /// For SD 1.x/2.x and SDXL this is really the number of heads per block (diffusers'
        /// naming quirk); the head width is the block's channels divided by it.
        public var attentionHeadDim: IntOrList
        public var numAttentionHeads: IntOrList?
        public var dualCrossAttention: Bool
        public var useLinearProjection: Bool
        public var classEmbedType: String?
        public var additionEmbedType: String?
        public var additionTimeEmbedDim: Int?
        public var numClassEmbeds: Int?
        /// Computes QKᵀ and softmax in float32 (SD 2.1); recorded on every attention op.
        public var upcastAttention: Bool
        public var resnetTimeScaleShift: String
        public var resnetSkipTimeAct: Bool
        public var resnetOutScaleFactor: Double
        public var timeEmbeddingType: String
        public var timeEmbeddingDim: Int?
        public var timeEmbeddingActFn: String?
        public var timestepPostAct: String?
        public var timeCondProjDim: Int?
        public var convInKernel: Int
        public var convOutKernel: Int
        public var projectionClassEmbeddingsInputDim: Int?
        public var attentionType: String
        public var classEmbeddingsConcat: Bool
        public var midBlockOnlyCrossAttention: Bool?
        public var crossAttentionNorm: String?
        public var additionEmbedTypeNumHeads: Int

        enum CodingKeys: String, CodingKey {
            case sampleSize = "sample_size", inChannels = "in_channels", outChannels = "out_channels"
            case centerInputSample = "center_input_sample", flipSinToCos = "flip_sin_to_cos", freqShift = "freq_shift"
            case downBlockTypes = "down_block_types", midBlockType = "mid_block_type", upBlockTypes = "up_block_types"
            case onlyCrossAttention = "only_cross_attention", blockOutChannels = "block_out_channels"
            case layersPerBlock = "layers_per_block", downsamplePadding = "downsample_padding"
            case midBlockScaleFactor = "mid_block_scale_factor", dropout, actFn = "act_fn"
            case normNumGroups = "norm_num_groups", normEps = "norm_eps", crossAttentionDim = "cross_attention_dim"
            case transformerLayersPerBlock = "transformer_layers_per_block"
            case reverseTransformerLayersPerBlock = "reverse_transformer_layers_per_block"
            case encoderHidDim = "encoder_hid_dim", encoderHidDimType = "encoder_hid_dim_type"
            case attentionHeadDim = "attention_head_dim", numAttentionHeads = "num_attention_heads"
            case dualCrossAttention = "dual_cross_attention", useLinearProjection = "use_linear_projection"
            case classEmbedType = "class_embed_type", additionEmbedType = "addition_embed_type"
            case additionTimeEmbedDim = "addition_time_embed_dim", numClassEmbeds = "num_class_embeds"
            case upcastAttention = "upcast_attention", resnetTimeScaleShift = "resnet_time_scale_shift"
            case resnetSkipTimeAct = "resnet_skip_time_act", resnetOutScaleFactor = "resnet_out_scale_factor"
            case timeEmbeddingType = "time_embedding_type", timeEmbeddingDim = "time_embedding_dim"
            case timeEmbeddingActFn = "time_embedding_act_fn", timestepPostAct = "timestep_post_act"
            case timeCondProjDim = "time_cond_proj_dim", convInKernel = "conv_in_kernel", convOutKernel = "conv_out_kernel"
            case projectionClassEmbeddingsInputDim = "projection_class_embeddings_input_dim"
            case attentionType = "attention_type", classEmbeddingsConcat = "class_embeddings_concat"
            case midBlockOnlyCrossAttention = "mid_block_only_cross_attention"
            case crossAttentionNorm = "cross_attention_norm", additionEmbedTypeNumHeads = "addition_embed_type_num_heads"
        }

        /// diffusers' defaults (an empty `{}` config is SD 1.x's architecture).
        public init() {
            sampleSize = nil
            inChannels = 4
            outChannels = 4
            centerInputSample = false
            flipSinToCos = true
            freqShift = 0
            downBlockTypes = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
            midBlockType = "UNetMidBlock2DCrossAttn"
            upBlockTypes = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
            onlyCrossAttention = .bool(false)
            blockOutChannels = [320, 640, 1280, 1280]
            layersPerBlock = .int(2)
            downsamplePadding = 1
            midBlockScaleFactor = 1
            dropout = 0
            actFn = "silu"
            normNumGroups = 32
            normEps = 1e-5
            crossAttentionDim = .int(1280)
            transformerLayersPerBlock = .int(1)
            reverseTransformerLayersPerBlock = nil
            encoderHidDim = nil
            encoderHidDimType = nil
            attentionHeadDim = .int(8)
            numAttentionHeads = nil
            dualCrossAttention = false
            useLinearProjection = false
            classEmbedType = nil
            additionEmbedType = nil
            additionTimeEmbedDim = nil
            numClassEmbeds = nil
            upcastAttention = false
            resnetTimeScaleShift = "default"
            resnetSkipTimeAct = false
            resnetOutScaleFactor = 1
            timeEmbeddingType = "positional"
            timeEmbeddingDim = nil
            timeEmbeddingActFn = nil
            timestepPostAct = nil
            timeCondProjDim = nil
            convInKernel = 3
            convOutKernel = 3
            projectionClassEmbeddingsInputDim = nil
            attentionType = "default"
            classEmbeddingsConcat = false
            midBlockOnlyCrossAttention = nil
            crossAttentionNorm = nil
            additionEmbedTypeNumHeads = 64
        }

        public init(from decoder: Swift.Decoder) throws {
            self.init()
            let c = try decoder.container(keyedBy: CodingKeys.self)
            sampleSize = try c.decodeIfPresent(IntOrList.self, forKey: .sampleSize)
            inChannels = try c.value(.inChannels, or: inChannels)
            outChannels = try c.value(.outChannels, or: outChannels)
            centerInputSample = try c.value(.centerInputSample, or: centerInputSample)
            flipSinToCos = try c.value(.flipSinToCos, or: flipSinToCos)
            freqShift = try c.value(.freqShift, or: freqShift)
            downBlockTypes = try c.value(.downBlockTypes, or: downBlockTypes)
            midBlockType = try c.nullable(.midBlockType, missing: midBlockType)
            upBlockTypes = try c.value(.upBlockTypes, or: upBlockTypes)
            onlyCrossAttention = try c.value(.onlyCrossAttention, or: onlyCrossAttention)
            blockOutChannels = try c.value(.blockOutChannels, or: blockOutChannels)
            layersPerBlock = try c.value(.layersPerBlock, or: layersPerBlock)
            downsamplePadding = try c.value(.downsamplePadding, or: downsamplePadding)
            midBlockScaleFactor = try c.value(.midBlockScaleFactor, or: midBlockScaleFactor)
            dropout = try c.value(.dropout, or: dropout)
            actFn = try c.value(.actFn, or: actFn)
            normNumGroups = try c.nullable(.normNumGroups, missing: normNumGroups)
            normEps = try c.value(.normEps, or: normEps)
            crossAttentionDim = try c.value(.crossAttentionDim, or: crossAttentionDim)
            transformerLayersPerBlock = try c.value(.transformerLayersPerBlock, or: transformerLayersPerBlock)
            reverseTransformerLayersPerBlock = try c.decodeIfPresent([[Int]].self, forKey: .reverseTransformerLayersPerBlock)
            encoderHidDim = try c.decodeIfPresent(Int.self, forKey: .encoderHidDim)
            encoderHidDimType = try c.decodeIfPresent(String.self, forKey: .encoderHidDimType)
            attentionHeadDim = try c.value(.attentionHeadDim, or: attentionHeadDim)
            numAttentionHeads = try c.decodeIfPresent(IntOrList.self, forKey: .numAttentionHeads)
            dualCrossAttention = try c.value(.dualCrossAttention, or: dualCrossAttention)
            useLinearProjection = try c.value(.useLinearProjection, or: useLinearProjection)
            classEmbedType = try c.decodeIfPresent(String.self, forKey: .classEmbedType)
            additionEmbedType = try c.decodeIfPresent(String.self, forKey: .additionEmbedType)
            additionTimeEmbedDim = try c.decodeIfPresent(Int.self, forKey: .additionTimeEmbedDim)
            numClassEmbeds = try c.decodeIfPresent(Int.self, forKey: .numClassEmbeds)
            // SDXL's file has `"upcast_attention": null`, which diffusers treats as false.
            upcastAttention = try c.value(.upcastAttention, or: upcastAttention)
            resnetTimeScaleShift = try c.value(.resnetTimeScaleShift, or: resnetTimeScaleShift)
            resnetSkipTimeAct = try c.value(.resnetSkipTimeAct, or: resnetSkipTimeAct)
            resnetOutScaleFactor = try c.value(.resnetOutScaleFactor, or: resnetOutScaleFactor)
            timeEmbeddingType = try c.value(.timeEmbeddingType, or: timeEmbeddingType)
            timeEmbeddingDim = try c.decodeIfPresent(Int.self, forKey: .timeEmbeddingDim)
            timeEmbeddingActFn = try c.decodeIfPresent(String.self, forKey: .timeEmbeddingActFn)
            timestepPostAct = try c.decodeIfPresent(String.self, forKey: .timestepPostAct)
            timeCondProjDim = try c.decodeIfPresent(Int.self, forKey: .timeCondProjDim)
            convInKernel = try c.value(.convInKernel, or: convInKernel)
            convOutKernel = try c.value(.convOutKernel, or: convOutKernel)
            projectionClassEmbeddingsInputDim = try c.decodeIfPresent(Int.self, forKey: .projectionClassEmbeddingsInputDim)
            attentionType = try c.value(.attentionType, or: attentionType)
            classEmbeddingsConcat = try c.value(.classEmbeddingsConcat, or: classEmbeddingsConcat)
            midBlockOnlyCrossAttention = try c.decodeIfPresent(Bool.self, forKey: .midBlockOnlyCrossAttention)
            crossAttentionNorm = try c.decodeIfPresent(String.self, forKey: .crossAttentionNorm)
            additionEmbedTypeNumHeads = try c.value(.additionEmbedTypeNumHeads, or: additionEmbedTypeNumHeads)
        }

        /// diffusers strips a `UNetRes` prefix from block type names.
        static func blockName(_ type: String) -> String { type.hasPrefix("UNetRes") ? String(type.dropFirst(7)) : type }

        static let kDownBlocks: Set<String> = ["KDownBlock2D", "KCrossAttnDownBlock2D"]
        static let kUpBlocks: Set<String> = ["KUpBlock2D", "KCrossAttnUpBlock2D"]

        /// Whether this is a K-UNet (the k-diffusion upscaler's blocks, sd-x2-latent-upscaler).
        public var isKUNet: Bool {
            !downBlockTypes.isEmpty && downBlockTypes.allSatisfy(Self.kDownBlocks.contains) && upBlockTypes.allSatisfy(Self.kUpBlocks.contains)
        }

        /// Which down blocks are `CrossAttnDownBlock2D` (the rest are plain `DownBlock2D`).
        public var downBlocksHaveCrossAttention: [Bool] { downBlockTypes.map { Self.blockName($0) == "CrossAttnDownBlock2D" } }

        /// Heads per down block: `num_attention_heads or attention_head_dim`, as diffusers reads it.
        public var numAttentionHeadsPerBlock: [Int] {
            (numAttentionHeads ?? attentionHeadDim).perBlock(downBlockTypes.count)
        }

        public var crossAttentionDims: [Int] { crossAttentionDim.perBlock(downBlockTypes.count) }

        /// `only_cross_attention` per down block (the up blocks take them reversed). diffusers'
        /// `UNetMidBlock2DCrossAttn` takes none (`mid_block_only_cross_attention` is for the
        /// simple-cross-attention mid block), so its first attention always attends to itself.
        public var onlyCrossAttentionPerBlock: [Bool] {
            switch onlyCrossAttention {
            case .bool(let b): return Array(repeating: b, count: downBlockTypes.count)
            case .list(let l): return l
            }
        }

        public var layersPerDownBlock: [Int] { layersPerBlock.perBlock(downBlockTypes.count) }
        public var transformerLayersPerDownBlock: [Int] { transformerLayersPerBlock.perBlock(downBlockTypes.count) }

        /// The time embedding's width: `time_embedding_dim`, else four times the first block's
        /// (twice with a Fourier projection, whose width it is too).
        public var timeEmbedDim: Int { timeEmbeddingDim ?? blockOutChannels[0] * (timeEmbeddingType == "fourier" ? 2 : 4) }

        /// What every resnet of the UNet (and of a ControlNet's copy of its encoder) shares.
        var resnetSettings: ResnetSettings {
            ResnetSettings(tembChannels: timeEmbedDim, groups: normNumGroups!, eps: normEps, act: DiffusersActivation.unary(actFn)!)
        }

        /// The width of each class label the UNet projects (`class_embed_type` "projection",
        /// Stable unCLIP's noised image embedding); nil when it takes none or whole labels.
        public var projectedClassLabelsDim: Int? {
            classEmbedType == "projection" ? projectionClassEmbeddingsInputDim : nil
        }

        /// The `class_labels` input of `batch` rows the config takes: int32 labels, projected
        /// vectors, or none.
        public func classLabelsInput(_ b: GraphBuilder, batch: Int) -> Value? {
            if numClassEmbeds != nil { return b.input(Name.classLabels, shape: [batch], dtype: .int32) }
            return projectedClassLabelsDim.map { b.input(Name.classLabels, shape: [batch, $0]) }
        }

        /// Width of `text_embeds` for text_time conditioning with `timeIds` micro-conditioning values.
        public func textEmbedsDim(timeIds: Int) -> Int {
            (projectionClassEmbeddingsInputDim ?? 0) - timeIds * (additionTimeEmbedDim ?? 0)
        }

        /// Throws for the first value the engine does not support, naming the key and value.
        public func validate() throws {
            func reject(_ key: String, _ value: String, _ reason: String) -> ConfigError {
                ConfigError(model: UNet2DConditionModel.className, key: key, value: value, reason: reason)
            }
            let n = downBlockTypes.count
            guard n > 0 else { throw reject("down_block_types", "[]", "the UNet needs at least one block") }
            if isKUNet { return try validateKUNet(reject) }
            if downBlockTypes.contains(where: Self.kDownBlocks.contains) || upBlockTypes.contains(where: Self.kUpBlocks.contains) {
                // diffusers' K blocks keep their own skips and widths: they do not mix with the others.
                let mixed = downBlockTypes.enumerated().first { !Self.kDownBlocks.contains($0.element) }.map { ("down_block_types[\($0.offset)]", $0.element) }
                    ?? upBlockTypes.enumerated().first { !Self.kUpBlocks.contains($0.element) }.map { ("up_block_types[\($0.offset)]", $0.element) }
                if let (key, value) = mixed { throw reject(key, json(value), "a K-UNet takes K blocks throughout (KDownBlock2D, KCrossAttnDownBlock2D; KUpBlock2D, KCrossAttnUpBlock2D)") }
            }
            for (i, t) in downBlockTypes.enumerated() where !["DownBlock2D", "CrossAttnDownBlock2D"].contains(Self.blockName(t)) {
                throw reject("down_block_types[\(i)]", json(t), "only DownBlock2D and CrossAttnDownBlock2D are implemented, or only K blocks (KDownBlock2D, KCrossAttnDownBlock2D)")
            }
            for (i, t) in upBlockTypes.enumerated() where !["UpBlock2D", "CrossAttnUpBlock2D"].contains(Self.blockName(t)) {
                throw reject("up_block_types[\(i)]", json(t), "only UpBlock2D and CrossAttnUpBlock2D are implemented, or only K blocks (KUpBlock2D, KCrossAttnUpBlock2D)")
            }
            if let m = midBlockType, m != "UNetMidBlock2DCrossAttn" {
                throw reject("mid_block_type", json(m), "only UNetMidBlock2DCrossAttn or null (no mid block) are implemented")
            }
            try validateBlockLists(reject, ("transformer_layers_per_block", transformerLayersPerBlock))
            if case .list(let l) = onlyCrossAttention, l.count != n {
                throw reject("only_cross_attention", onlyCrossAttention.description, "must be one flag or one per down block (\(n))")
            }
            if dualCrossAttention { throw reject("dual_cross_attention", "true", "only false is implemented") }
            if let r = reverseTransformerLayersPerBlock {
                throw reject("reverse_transformer_layers_per_block", "\(r)", "asymmetric UNets are not implemented")
            }
            guard let groups = normNumGroups else {
                throw reject("norm_num_groups", "null", "UNets without output normalization are not implemented")
            }
            for (i, ch) in blockOutChannels.enumerated() where ch <= 0 || ch % groups != 0 {
                throw reject("block_out_channels[\(i)]", "\(ch)", "must be a positive multiple of norm_num_groups (\(groups))")
            }
            let heads = numAttentionHeadsPerBlock
            for (i, t) in downBlockTypes.enumerated() where Self.blockName(t).hasPrefix("CrossAttn") {
                if blockOutChannels[i] % heads[i] != 0 {
                    throw reject("attention_head_dim[\(i)]", "\(heads[i])",
                                 "block \(i) has \(blockOutChannels[i]) channels, not divisible into \(heads[i]) heads")
                }
            }
            if let e = encoderHidDim { throw reject("encoder_hid_dim", "\(e)", "encoder hidden-state projections are not implemented") }
            if let e = encoderHidDimType { throw reject("encoder_hid_dim_type", json(e), "only null is implemented") }
            switch classEmbedType {
            case nil: break
            case "projection":
                guard let d = projectionClassEmbeddingsInputDim, d > 0 else {
                    throw reject("class_embed_type", json(classEmbedType), "needs a positive projection_class_embeddings_input_dim")
                }
                if additionEmbedType != nil || numClassEmbeds != nil {
                    throw reject("class_embed_type", json(classEmbedType), "cannot share projection_class_embeddings_input_dim with addition_embed_type or num_class_embeds")
                }
            case let t?:
                throw reject("class_embed_type", json(t), "only null (an nn.Embedding of num_class_embeds classes) and \"projection\" are implemented")
            }
            if let k = numClassEmbeds, k <= 0 { throw reject("num_class_embeds", "\(k)", "must be positive") }
            if classEmbeddingsConcat { throw reject("class_embeddings_concat", "true", "only false (added to the time embedding) is implemented") }
            switch additionEmbedType {
            case nil: break
            case "text_time":
                guard let d = additionTimeEmbedDim, d > 0 else {
                    throw reject("addition_time_embed_dim", json(additionTimeEmbedDim), "text_time conditioning needs a positive width")
                }
                guard let proj = projectionClassEmbeddingsInputDim, proj > 0 else {
                    throw reject("projection_class_embeddings_input_dim", json(projectionClassEmbeddingsInputDim),
                                 "text_time conditioning needs the width of text_embeds ⧺ time embeddings")
                }
            case let t?:
                throw reject("addition_embed_type", json(t), "only null and \"text_time\" are implemented")
            }
            if resnetTimeScaleShift != "default" {
                throw reject("resnet_time_scale_shift", json(resnetTimeScaleShift), "only \"default\" is implemented")
            }
            try validateTimeEmbedding(reject)
            if attentionType != "default" {
                throw reject("attention_type", json(attentionType), "only \"default\" is implemented (no GLIGEN)")
            }
            if let n = crossAttentionNorm { throw reject("cross_attention_norm", json(n), "only null is implemented") }
            try validateConvolutions(reject)
        }

        /// What every UNet's config holds, whatever its blocks: as many up blocks and widths as down
        /// blocks, the per-block lists (and `extraLists`) one positive entry per block, one
        /// cross-attention width, no `num_attention_heads`, a known activation.
        private func validateBlockLists(_ reject: (String, String, String) -> ConfigError, _ extraLists: (String, IntOrList)...) throws {
            let n = downBlockTypes.count
            if upBlockTypes.count != n {
                throw reject("up_block_types", "\(upBlockTypes.count) blocks", "must match the \(n) down_block_types")
            }
            if blockOutChannels.count != n {
                throw reject("block_out_channels", "\(blockOutChannels)", "must have one entry per down block (\(n))")
            }
            if let h = numAttentionHeads {
                // diffusers raises here too: the key is reserved because of the naming quirk.
                throw reject("num_attention_heads", h.description, "diffusers reads the heads from attention_head_dim")
            }
            for (key, v) in [("attention_head_dim", attentionHeadDim), ("cross_attention_dim", crossAttentionDim),
                             ("layers_per_block", layersPerBlock)] + extraLists {
                if case .list(let l) = v, l.count != n {
                    throw reject(key, v.description, "must have one entry per down block (\(n))")
                }
                if v.perBlock(n).contains(where: { $0 <= 0 }) {
                    throw reject(key, v.description, "entries must be positive")
                }
            }
            if Set(crossAttentionDims).count > 1 {
                throw reject("cross_attention_dim", crossAttentionDim.description,
                             "every block attends to the same encoder_hidden_states, so the widths must agree")
            }
            if DiffusersActivation.unary(actFn) == nil {
                throw reject("act_fn", json(actFn), "supported activations are silu, swish, gelu and relu")
            }
        }

        private func validateTimeEmbedding(_ reject: (String, String, String) -> ConfigError) throws {
            if !["positional", "fourier"].contains(timeEmbeddingType) {
                throw reject("time_embedding_type", json(timeEmbeddingType), "only \"positional\" and \"fourier\" are implemented")
            }
            if timeEmbeddingType == "fourier" && timeEmbedDim % 2 != 0 {
                throw reject("time_embedding_dim", "\(timeEmbedDim)", "a Fourier time projection needs an even width, as in diffusers")
            }
            if let a = timeEmbeddingActFn, DiffusersActivation.unary(a) == nil {
                throw reject("time_embedding_act_fn", json(a), "supported activations are silu, swish, gelu and relu")
            }
            if let a = timestepPostAct, DiffusersActivation.unary(a) == nil {
                throw reject("timestep_post_act", json(a), "supported activations are silu, swish, gelu and relu")
            }
            if (timeEmbeddingDim ?? 1) <= 0 { throw reject("time_embedding_dim", json(timeEmbeddingDim), "must be positive") }
        }

        private func validateConvolutions(_ reject: (String, String, String) -> ConfigError) throws {
            for (key, k) in [("conv_in_kernel", convInKernel), ("conv_out_kernel", convOutKernel)] where k <= 0 || k % 2 == 0 {
                throw reject(key, "\(k)", "kernels must be odd so the convolution keeps the size")
            }
            if downsamplePadding < 0 { throw reject("downsample_padding", "\(downsamplePadding)", "must not be negative") }
        }

        /// A K-UNet's config: K blocks throughout, no mid block, and what diffusers' K blocks need
        /// to fit together (they ignore the resnet settings a UNet of the other blocks reads).
        private func validateKUNet(_ reject: (String, String, String) -> ConfigError) throws {
            let n = downBlockTypes.count
            if let m = midBlockType { throw reject("mid_block_type", json(m), "a K-UNet has no mid block (null)") }
            try validateBlockLists(reject)
            // Each K norm has channels / 32 groups.
            for (i, ch) in blockOutChannels.enumerated() where ch < 32 || ch % (ch / 32) != 0 {
                throw reject("block_out_channels[\(i)]", "\(ch)", "the K blocks' norms take channels / 32 groups: at least 32 channels, divisible into those groups")
            }
            if let groups = normNumGroups, blockOutChannels[0] % groups != 0 {
                throw reject("norm_num_groups", "\(groups)", "must divide block_out_channels[0] (\(blockOutChannels[0]))")
            }
            let headDims = attentionHeadDim.perBlock(n)
            for (i, t) in downBlockTypes.enumerated() where t == "KCrossAttnDownBlock2D" && blockOutChannels[i] < headDims[i] {
                throw reject("attention_head_dim[\(i)]", "\(headDims[i])", "block \(i) has \(blockOutChannels[i]) channels, fewer than one head")
            }
            try validateTimeEmbedding(reject)
            if let last = upBlockTypes.first, last == "KCrossAttnUpBlock2D", downBlockTypes.last == "KCrossAttnDownBlock2D",
               n > 1, !(blockOutChannels[n - 1] == blockOutChannels[n - 2] && blockOutChannels[n - 1] == timeEmbedDim) {
                // The deepest down block keeps no skips, so the first up block must start from its
                // output alone, which diffusers builds only when in, out and time widths agree.
                throw reject("block_out_channels", "\(blockOutChannels)", "the K-UNet's first up block takes the deepest output alone only where its last two widths and the time embedding's (\(timeEmbedDim)) agree")
            }
            if resnetSkipTimeAct || resnetOutScaleFactor != 1 || classEmbedType != nil || numClassEmbeds != nil || additionEmbedType != nil
                || encoderHidDim != nil || encoderHidDimType != nil || dualCrossAttention {
                throw reject("down_block_types", json(downBlockTypes.description), "a K-UNet takes no class, addition or encoder projection embeddings")
            }
            try validateConvolutions(reject)
        }
    }
}
