import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
#if canImport(Glibc)
import Glibc
#endif

/// Model benchmarks: a component of a real architecture (seeded random weights when no model is
/// given — timings do not depend on weight values) or the whole pipeline, timed under each
/// setup — each speed or memory technique as a switch — with peak memory and the output's error
/// against the first (baseline) setup. Rows follow the schema the diffusers peer scripts print
/// (`shared/bench/bench_diffusers_*.py`), so the two compare row by row.
public enum Benchmark {
    public enum Component: String, CaseIterable {
        case unet, vae, taesd, textEncoder = "text-encoder", depthEstimator = "depth-estimator", safetyChecker = "safety-checker", pipeline
    }

    /// One configuration of the engine.
    public struct Setup {
        public var name: String
        public var options: PipelineOptions
        /// Swap in the tiny autoencoder (TAESD) for decoding.
        public var tinyVAE = false
        /// Generation features measured by what they cost (pipeline component only): FreeU with
        /// the family's recommended values, perturbed-attention guidance with diffusers' defaults.
        public var freeU = false
        public var pag = false

        /// The named setups of the seed documents; `a+b` applies both (e.g. `fp16+sequential-offload`).
        public static func named(_ name: String, backend: String) throws -> Setup {
            var setup = Setup(name: name, options: PipelineOptions())
            for part in name.split(separator: "+") { try apply(String(part), to: &setup) }
            return setup
        }

        static func apply(_ name: String, to setup: inout Setup) throws {
            var o = setup.options
            switch name {
            case "baseline": o.attention = .math; o.flags.insert("baseline")
            case "fused-attention": o.flags.insert("baseline")
            case "compiled": break
            case "fused-qkv": o.fuseQKV = true
            case "int8": o.fuseQKV = true; o.quantization = .dynamicInt8
            case "int8-conv": o.fuseQKV = true; o.quantization = .dynamicInt8; o.quantizeConvolutions = true
            case "fp8": o.fuseQKV = true; o.quantization = .fp8
            case "channels-last": o.flags.insert("channels-last")
            case "autotune": o.flags.insert("autotune")
            case "basic-attention": o.flags.insert("basic-attention")  // CUDA: the unpipelined attention kernel
            case "fp16-compiled-nhwc": o.precision = .float16; o.fuseQKV = true; o.flags.formUnion(["cuda-graphs", "channels-last"])
            case "bf16-compiled-nhwc": o.precision = .bfloat16; o.fuseQKV = true; o.flags.formUnion(["cuda-graphs", "channels-last"])
            case "fp16-weights": o.weightStorage = .float16
            case "bf16-weights": o.weightStorage = .bfloat16
            case "tiny-vae": setup.tinyVAE = true
            case "freeu": setup.freeU = true
            case "pag": setup.pag = true
            case "tiled-vae": o.vaeTile = 512
            case "vae-slicing": o.vaeSlicing = true
            case "low-memory", "model-offload": o.releaseComponentsAfterUse = true
            case "sequential-offload": o.sequentialOffload = true
            case "fp16-weights-low-memory": o.weightStorage = .float16; o.releaseComponentsAfterUse = true
            case "sliced-attention": o.attention = .sliced(1024)
            case "fp32": o.precision = .float32
            case "tf32": o.precision = .tf32
            case "fp16": o.precision = .float16
            case "bf16": o.precision = .bfloat16
            case "fp16-fused-qkv": o.precision = .float16; o.fuseQKV = true
            case "fp16-graphs": o.precision = .float16; o.flags.insert("cuda-graphs")
            case "bf16-graphs": o.precision = .bfloat16; o.flags.insert("cuda-graphs")
            case "fp16-compiled": o.precision = .float16; o.fuseQKV = true; o.flags.insert("cuda-graphs")
            case "bf16-compiled": o.precision = .bfloat16; o.fuseQKV = true; o.flags.insert("cuda-graphs")
            case "bf16-fused-qkv": o.precision = .bfloat16; o.fuseQKV = true
            case "bf16-int8": o.precision = .bfloat16; o.fuseQKV = true; o.quantization = .dynamicInt8
            case "bf16-fp8": o.precision = .bfloat16; o.fuseQKV = true; o.quantization = .fp8
            default:
                throw PipelineError("unknown setup '\(name)'; setups: baseline, fused-attention, compiled, fused-qkv, int8, int8-conv, fp8, "
                                    + "fp16-weights, bf16-weights, low-memory (= model-offload), sequential-offload, fp16-weights-low-memory, "
                                    + "tiny-vae, freeu, pag (pipeline only), tiled-vae, vae-slicing, sliced-attention, fp32, tf32, fp16, bf16, "
                                    + "fp16-fused-qkv, bf16-fused-qkv, fp16-graphs, bf16-graphs, fp16-compiled, bf16-compiled, fp16-compiled-nhwc, bf16-compiled-nhwc, channels-last, autotune, basic-attention, bf16-int8, bf16-fp8; "
                                    + "join setups with + to combine them")
            }
            setup.options = o
        }
    }

    public struct Row {
        public var setup: String
        public var component: String
        public var architecture: String
        public var size: String
        public var batch: Int
        public var times: [Double]
        public var flops: Double?
        public var peakRSS: Int
        public var peakDevice: Int?
        public var maxRelErr: Float?
        public var note: String
        /// Denoising steps (pipeline rows).
        public var steps: Int? = nil
        /// The first run: compilation (kernels, primitives, graph capture) included.
        public var firstRun: Double? = nil

        /// 0 for a setup that did not run (its note says why).
        public var median: Double { times.isEmpty ? 0 : times.sorted()[times.count / 2] }
        public var gflops: Double? { times.isEmpty ? nil : flops.map { $0 / median / 1e9 } }

        public var json: JSON {
            var m: [(String, JSON)] = [
                ("setup", .string(setup)), ("component", .string(component)), ("architecture", .string(architecture)),
                ("size", .string(size)), ("batch", .number(Double(batch))),
                ("median_s", times.isEmpty ? .null : .number(median)), ("min_s", .number(times.min() ?? 0)), ("max_s", .number(times.max() ?? 0)),
                ("gflops", gflops.map { .number(($0 * 10).rounded() / 10) } ?? .null),
                ("peak_rss_mb", .number(Double(peakRSS >> 20))),
                ("max_rel_err", maxRelErr.map { .number(Double($0)) } ?? .null),
            ]
            if let d = peakDevice { m.append(("peak_gpu_mb", .number(Double(d >> 20)))) }
            if let steps, !times.isEmpty {
                m.append(("steps", .number(Double(steps))))
                m.append(("it_per_s", .number((Double(steps) / median * 100).rounded() / 100)))
            }
            if let f = firstRun { m.append(("first_run_s", .number((f * 100).rounded() / 100))) }
            if !note.isEmpty { m.append(("note", .string(note))) }
            return .object(m)
        }
    }

    public struct Request {
        public var component: Component
        public var architecture: String
        public var width: Int
        public var height: Int
        public var steps: Int
        public var batch: Int?
        public var reps: Int
        public var setups: [Setup]
        /// The sampler of pipeline rows (the seeds' tables use DDIM, and PNDM for BK-SDM).
        public var scheduler = "ddim"
        public init(component: Component, architecture: String, width: Int, height: Int, steps: Int, batch: Int?, reps: Int, setups: [Setup]) {
            self.component = component
            self.architecture = architecture
            self.width = width
            self.height = height
            self.steps = steps
            self.batch = batch
            self.reps = reps
            self.setups = setups
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
        for i in y.indices where i < x.count { err = max(err, abs(x[i] - y[i])); m = max(m, abs(y[i])) }
        return x.count == y.count ? err / max(m, 1e-12) : .infinity
    }

    /// Runs every setup. `components(setup)` makes fresh components (weights are shared only
    /// within a setup, so memory is measured per setup). `log` gets each row as it is done.
    public static func run(_ r: Request, backend: Backend, components: () throws -> StableDiffusionComponents,
                           log: (Row) -> Void) throws -> [Row] {
        var rows: [Row] = []
        var baseline: Tensor?
        for setup in r.setups {
            resetPeakRSS()
            backend.resetPeakMemory()  // each row its own peak, not the run's
            var c = try components()
            if setup.tinyVAE { c.vae = try tinyAutoencoder(seed: 11) }
            let pipeline = StableDiffusionPipeline(components: c, backend: backend, options: setup.options)
            var note = ""
            let measured: (times: [Double], output: Tensor, flops: Double?, batch: Int, first: Double)
            do {
                measured = try runComponent(r, pipeline, setup)
            } catch {
                note = "not run: \(error)"
                let row = Row(setup: setup.name, component: r.component.rawValue, architecture: r.architecture, size: "\(r.width)x\(r.height)",
                              batch: r.batch ?? 1, times: [], flops: nil, peakRSS: peakResidentBytes(), peakDevice: nil,
                              maxRelErr: nil, note: note)
                log(row)
                rows.append(row)
                continue
            }
            let err = baseline.map { relativeError(measured.output, $0) }
            if let tile = setup.options.vaeTile, r.component == .vae, measured.output.shape[1] > tile || measured.output.shape[2] > tile {
                note = seamReport(measured.output, stride: TiledDecoder(tileSize: tile, factor: c.vae.model.spatialScaleFactor).pixelStride,
                                  against: baseline)
            }
            if baseline == nil { baseline = measured.output }
            // The depth estimator reads the size its processor makes, whatever --size says.
            let size = r.component == .depthEstimator ? "\(measured.output.shape[2])x\(measured.output.shape[1])" : "\(r.width)x\(r.height)"
            let row = Row(setup: setup.name, component: r.component.rawValue, architecture: r.architecture, size: size,
                          batch: measured.batch, times: measured.times, flops: measured.flops, peakRSS: peakResidentBytes(),
                          peakDevice: backend.name == "cpu" ? nil : backend.peakMemoryBytes, maxRelErr: err, note: note,
                          steps: r.component == .pipeline ? r.steps : nil, firstRun: measured.first)
            log(row)
            rows.append(row)
        }
        return rows
    }

    /// How visible tile borders are in a tiled decode (images [N,H,W,3] uint8): the mean
    /// absolute step between neighbouring pixels across the borders (every `stride` pixels)
    /// against the same everywhere else — near 1 means no seam — and, given the untiled
    /// decode, the mean and max difference in levels.
    static func seamReport(_ images: Tensor, stride: Int, against untiled: Tensor?) -> String {
        let (h, w) = (images.shape[1], images.shape[2])
        let p = images.toFloatArray()
        func px(_ y: Int, _ x: Int, _ c: Int) -> Float { p[(y * w + x) * 3 + c] }
        var border = 0.0, borderCount = 0, inner = 0.0, innerCount = 0
        for y in 0..<h {
            for x in 1..<w {
                var d: Float = 0
                for c in 0..<3 { d += abs(px(y, x, c) - px(y, x - 1, c)) }
                if x % stride == 0 { border += Double(d); borderCount += 1 } else { inner += Double(d); innerCount += 1 }
            }
        }
        for y in 1..<h {
            for x in 0..<w {
                var d: Float = 0
                for c in 0..<3 { d += abs(px(y, x, c) - px(y - 1, x, c)) }
                if y % stride == 0 { border += Double(d); borderCount += 1 } else { inner += Double(d); innerCount += 1 }
            }
        }
        let ratio = (border / Double(max(borderCount, 1))) / max(inner / Double(max(innerCount, 1)), 1e-9)
        var note = "seam: gradient across tile borders / elsewhere = \((ratio * 1000).rounded() / 1000)"
        if let u = untiled, u.count == images.count {
            let q = u.toFloatArray()
            var sum = 0.0, worst: Float = 0
            for i in q.indices { let d = abs(p[i] - q[i]); sum += Double(d); worst = max(worst, d) }
            note += "; vs untiled: mean |Δ| \((sum / Double(q.count) * 100).rounded() / 100), max \(Int(worst)) levels"
        }
        return note
    }

    /// The tiny autoencoder (TAESD's architecture, random weights).
    static func tinyAutoencoder(seed: UInt64) throws -> AutoencoderComponent {
        guard let config = EmbeddedArchitecture.taesd.file("config.json") else { throw PipelineError("no built-in TAESD config") }
        let model = try AutoencoderTiny(config: try decodeConfiguration(AutoencoderTiny.Configuration.self, from: config.bytes, origin: config.origin))
        return AutoencoderComponent(model: model, weights: ModelWeights(model.randomWeights(seed: seed)))
    }

    /// DPT-Hybrid (Intel/dpt-hybrid-midas's architecture) with seeded random weights.
    static func randomDepthEstimator(seed: UInt64) throws -> DepthEstimatorComponent {
        let model = try DPTForDepthEstimation(config: .dptHybridMidas)
        var processor = DPTImageProcessor()
        (processor.height, processor.width) = (model.config.imageSize, model.config.imageSize)
        return DepthEstimatorComponent(name: "DPT-Hybrid (random weights)", model: model,
                                       weights: ModelWeights(model.standardizingWeights(model.randomWeights(seed: seed))), processor: processor)
    }

    /// SD 1.x's safety checker (CompVis/stable-diffusion-safety-checker: openai's CLIP ViT-L/14
    /// vision tower, 224 px, projection 768) with random weights and thresholds out of reach.
    static func randomSafetyChecker(seed: UInt64) throws -> SafetyCheckerComponent {
        var vision = CLIPVisionConfig()
        (vision.hiddenSize, vision.intermediateSize, vision.numHiddenLayers, vision.numAttentionHeads) = (1024, 4096, 24, 16)
        (vision.imageSize, vision.patchSize, vision.projectionDim, vision.hiddenAct, vision.layerNormEps) = (224, 14, 768, "quick_gelu", 1e-5)
        let model = try CLIPVisionModelWithProjection(config: vision, encoderScope: ["vision_model", "vision_model"])
        let unit = [Float](repeating: 1 / Float(768).squareRoot(), count: 768)
        return SafetyCheckerComponent(model: model, weights: ModelWeights(model.randomWeights(seed: seed)),
                                      processor: CLIPImageProcessor(imageSize: 224),
                                      concepts: SafetyConcepts(concepts: Array(repeating: unit, count: 17), conceptThresholds: Array(repeating: 2, count: 17),
                                                               specialCare: Array(repeating: unit, count: 3), specialCareThresholds: Array(repeating: 2, count: 3)))
    }

    /// Times one component under one pipeline's options: a warm-up run, then `reps` timed runs.
    static func runComponent(_ r: Request, _ p: StableDiffusionPipeline, _ setup: Setup) throws -> (times: [Double], output: Tensor, flops: Double?, batch: Int, first: Double) {
        if (setup.freeU || setup.pag) && r.component != .pipeline {
            throw PipelineError("freeu and pag change a generation: bench them with --component pipeline")
        }
        let c = p.components
        let backend = p.backend
        let f = c.vae.model.spatialScaleFactor
        let (h, w) = (r.height / f, r.width / f)
        let generator = TorchCPUGenerator(seed: 99)
        func random(_ name: String, _ shape: [Int]) throws -> Tensor { generator.randn(shape) }
        var first = 0.0
        func timed(_ body: () throws -> Tensor) throws -> ([Double], Tensor) {
            let t0 = now()
            var out = try body()  // warm-up: compiles, first-touches the arena
            try backend.synchronize()
            first = now() - t0
            var times: [Double] = []
            for _ in 0..<r.reps {
                let t0 = now()
                out = try body()
                try backend.synchronize()
                times.append(now() - t0)
            }
            return (times, out)
        }
        switch r.component {
        case .unet:
            let batch = r.batch ?? 2  // classifier-free guidance runs two rows
            let contextDim = c.textEncoders.reduce(0) { $0 + $1.component.encoder.hiddenSize }
            let exe = try p.executable("bench.unet|\(batch)|\(h)x\(w)", weights: c.unetWeights, options: p.compileOptions) {
                try c.unet.graph(batch: batch, height: h, width: w, sequenceLength: 77, timeIds: c.timeIdCount)
            }
            var feeds: [String: DeviceTensor] = [
                UNet2DConditionModel.Name.sample: try backend.upload(try random("sample", [batch, c.unet.config.inChannels, h, w])),
                UNet2DConditionModel.Name.timestep: try backend.upload(Tensor(shape: [batch], floats: Array(repeating: 500, count: batch))),
                UNet2DConditionModel.Name.encoderHiddenStates: try backend.upload(try random("context", [batch, 77, contextDim])),
            ]
            if c.unet.usesTextTimeConditioning {
                let pooled = c.textEncoder2?.encoder.config.projectionDim ?? 1280
                feeds[UNet2DConditionModel.Name.textEmbeds] = try backend.upload(try random("pooled", [batch, pooled]))
                feeds[UNet2DConditionModel.Name.timeIds] = try backend.upload(
                    p.timeIds(GenerationRequest(prompt: ""), width: r.width, height: r.height, count: batch, guidance: false))
            }
            let (times, out) = try timed { try exe.run(feeds)[UNet2DConditionModel.Name.noisePred]!.toHost() }
            return (times, out, exe.graph.flops, batch, first)
        case .vae, .taesd:
            var components = c
            if r.component == .taesd { components.vae = try tinyAutoencoder(seed: 11) }
            let decoder = StableDiffusionPipeline(components: components, backend: backend, options: p.options)
            let latents = try random("latents", [r.batch ?? 1, components.vae.model.latentChannels, h, w])
            let (times, out) = try timed { VaeImageProcessor.uint8Tensor(try decoder.decode(latents)) }
            return (times, out, nil, r.batch ?? 1, first)
        case .textEncoder:
            let te = c.textEncoders[0].component
            let ids = (0..<2).map { _ in te.tokenizer("a photograph of an astronaut riding a horse").inputIds }
            let exe = try p.executable("bench.text|2", weights: te.weights, options: p.textEncoderCompileOptions) {
                try te.encoder.graph(batch: 2, sequenceLength: ids[0].count, outputs: [.lastHiddenState])
            }
            let feeds = [CLIPTextModel.Name.inputIds: try backend.upload(te.encoder.inputIdsTensor(ids))]
            let (times, out) = try timed { try exe.run(feeds)[CLIPTextOutput.lastHiddenState.name]!.toHost() }
            return (times, out, exe.graph.flops, 2, first)
        case .depthEstimator:
            // The model's own, or DPT-Hybrid (stable-diffusion-2-depth's) with random weights, on
            // one picture as its processor prepares it.
            let estimator = try c.depthEstimator ?? randomDepthEstimator(seed: 13)
            let side = estimator.model.config.imageSize
            let pixels = try random("pixels", [1, 3, side, side])
            let exe = try p.executable("bench.depth|\(side)", weights: estimator.weights, options: p.textEncoderCompileOptions) {
                try estimator.model.graph(batch: 1, height: side, width: side)
            }
            let feeds = [DPTForDepthEstimation.pixelValues: try backend.upload(pixels)]
            let (times, out) = try timed { try exe.run(feeds)[DPTForDepthEstimation.predictedDepth]!.toHost() }
            return (times, out, exe.graph.flops, 1, first)
        case .safetyChecker:
            // The model's own, or SD 1.x's with random weights, on decoded images of the bench's
            // size: the processor, the encoder and the scoring, as each generation runs them
            // (the blacking out of a flagged image, a copy, aside).
            var components = c
            if components.safetyChecker == nil { components.safetyChecker = try randomSafetyChecker(seed: 17) }
            let checking = StableDiffusionPipeline(components: components, backend: backend, options: p.options)
            let pixels = try random("images", [r.batch ?? 1, r.height, r.width, 3]).toFloatArray()
            let images = (0..<(r.batch ?? 1)).map { i in
                Image(width: r.width, height: r.height, channels: 3,
                      pixels: pixels[(i * r.width * r.height * 3)..<((i + 1) * r.width * r.height * 3)].map { UInt8(clamping: Int(abs($0) * 80)) })
            }
            let checker = components.safetyChecker!
            // The embeddings are the output, so the error column shows what a setup does to them.
            let (times, out) = try timed {
                let embeds = try checking.safetyCheckerEmbeds(images, checker)
                _ = checker.concepts.flags(imageEmbeds: embeds)
                return embeds
            }
            return (times, out, nil, r.batch ?? 1, first)
        case .pipeline:
            var g = GenerationRequest(prompt: "a photograph of an astronaut riding a horse")
            g.steps = r.steps
            g.width = r.width
            g.height = r.height
            g.count = r.batch ?? 1
            g.seed = 0
            g.scheduler = r.scheduler
            if setup.freeU { g.freeU = .recommended(for: c) }
            if setup.pag { g.pag = PerturbedAttentionGuidance() }
            let (times, out) = try timed { VaeImageProcessor.uint8Tensor(try p.generate(g).images) }
            return (times, out, nil, r.batch ?? 1, first)
        }
    }
}
