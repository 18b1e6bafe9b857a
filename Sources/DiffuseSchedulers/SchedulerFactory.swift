import DiffuseCore

/// The schedulers the command line offers, named as AUTOMATIC1111's samplers are where it has
/// them. Each is built from the model's `scheduler_config.json` as diffusers'
/// `Cls.from_config(pipe.scheduler.config, **overrides)` builds it: keys the file lacks take the
/// class's own defaults, and the name may fix a few keys ("-karras": Karras sigmas).
public enum SchedulerName: String, CaseIterable, Sendable {
    case ddim
    case ddpm
    case pndm
    case euler
    case eulerAncestral = "euler-a"
    case heun
    case dpm2
    case dpm2Karras = "dpm2-karras"
    case dpm2Ancestral = "dpm2-a"
    case dpm2AncestralKarras = "dpm2-a-karras"
    case lms
    case lmsKarras = "lms-karras"
    case dpmPlusPlus2M = "dpm++2m"
    case dpmPlusPlus2MKarras = "dpm++2m-karras"
    case dpmPlusPlus2MSDE = "dpm++2m-sde"
    case dpmPlusPlus2MSDEKarras = "dpm++2m-sde-karras"
    case dpmPlusPlus3MSDE = "dpm++3m-sde"
    case dpmPlusPlus3MSDEKarras = "dpm++3m-sde-karras"
    case dpmPlusPlus2S = "dpm++2s"
    case dpmPlusPlus2SKarras = "dpm++2s-karras"
    case dpmPlusPlusSDE = "dpm++sde"
    case dpmPlusPlusSDEKarras = "dpm++sde-karras"
    case deis
    case unipc
    case lcm
    case tcd

    /// A name as typed (case-insensitive); an unknown name is an error listing the valid ones.
    public init(parsing name: String) throws {
        guard let value = SchedulerName(rawValue: name.lowercased()) else {
            throw SchedulerError.unknownScheduler(name: name, valid: SchedulerName.allCases.map(\.rawValue))
        }
        self = value
    }

    /// AUTOMATIC1111's name for the sampler (its "Sampler" parameter).
    public var samplerName: String {
        switch self {
        case .ddim: return "DDIM"
        case .ddpm: return "DDPM"
        case .pndm: return "PLMS"
        case .euler: return "Euler"
        case .eulerAncestral: return "Euler a"
        case .heun: return "Heun"
        case .dpm2: return "DPM2"
        case .dpm2Karras: return "DPM2 Karras"
        case .dpm2Ancestral: return "DPM2 a"
        case .dpm2AncestralKarras: return "DPM2 a Karras"
        case .lms: return "LMS"
        case .lmsKarras: return "LMS Karras"
        case .dpmPlusPlus2M: return "DPM++ 2M"
        case .dpmPlusPlus2MKarras: return "DPM++ 2M Karras"
        case .dpmPlusPlus2MSDE: return "DPM++ 2M SDE"
        case .dpmPlusPlus2MSDEKarras: return "DPM++ 2M SDE Karras"
        case .dpmPlusPlus3MSDE: return "DPM++ 3M SDE"
        case .dpmPlusPlus3MSDEKarras: return "DPM++ 3M SDE Karras"
        // No AUTOMATIC1111 sampler is this deterministic singlestep solver (A1111's stochastic
        // "DPM++ SDE" is DPMSolverSDEScheduler, below); the name says what it is.
        case .dpmPlusPlus2S: return "DPM++ 2S"
        case .dpmPlusPlus2SKarras: return "DPM++ 2S Karras"
        case .dpmPlusPlusSDE: return "DPM++ SDE"
        case .dpmPlusPlusSDEKarras: return "DPM++ SDE Karras"
        case .deis: return "DEIS"
        case .unipc: return "UniPC"
        case .lcm: return "LCM"
        case .tcd: return "TCD"
        }
    }

    /// The diffusers class behind the name.
    public var className: String {
        switch self {
        case .ddim: return "DDIMScheduler"
        case .ddpm: return "DDPMScheduler"
        case .pndm: return "PNDMScheduler"
        case .euler: return "EulerDiscreteScheduler"
        case .eulerAncestral: return "EulerAncestralDiscreteScheduler"
        case .heun: return "HeunDiscreteScheduler"
        case .dpm2, .dpm2Karras: return "KDPM2DiscreteScheduler"
        case .dpm2Ancestral, .dpm2AncestralKarras: return "KDPM2AncestralDiscreteScheduler"
        case .lms, .lmsKarras: return "LMSDiscreteScheduler"
        case .dpmPlusPlus2M, .dpmPlusPlus2MKarras, .dpmPlusPlus2MSDE, .dpmPlusPlus2MSDEKarras, .dpmPlusPlus3MSDE, .dpmPlusPlus3MSDEKarras:
            return "DPMSolverMultistepScheduler"
        case .dpmPlusPlus2S, .dpmPlusPlus2SKarras: return "DPMSolverSinglestepScheduler"
        case .dpmPlusPlusSDE, .dpmPlusPlusSDEKarras: return "DPMSolverSDEScheduler"
        case .deis: return "DEISMultistepScheduler"
        case .unipc: return "UniPCMultistepScheduler"
        case .lcm: return "LCMScheduler"
        case .tcd: return "TCDScheduler"
        }
    }

    /// The config keys the name fixes on top of the model's config ("2M" is DPM-Solver++ of order 2,
    /// "3M" of order 3, "SDE" its stochastic form: diffusers draws its noise step by step, where
    /// AUTOMATIC1111's k-diffusion samplers of these names take it from a Brownian tree).
    public var overrides: [String: JSON] {
        let karras: [String: JSON] = rawValue.hasSuffix("-karras") ? ["use_karras_sigmas": .bool(true)] : [:]
        switch self {
        case .dpmPlusPlus2M, .dpmPlusPlus2MKarras, .dpmPlusPlus2S, .dpmPlusPlus2SKarras:
            return karras.merging(["algorithm_type": .string("dpmsolver++"), "solver_order": .number(2)]) { $1 }
        case .dpmPlusPlus2MSDE, .dpmPlusPlus2MSDEKarras:
            return karras.merging(["algorithm_type": .string("sde-dpmsolver++"), "solver_order": .number(2)]) { $1 }
        case .dpmPlusPlus3MSDE, .dpmPlusPlus3MSDEKarras:
            return karras.merging(["algorithm_type": .string("sde-dpmsolver++"), "solver_order": .number(3)]) { $1 }
        default:
            return karras
        }
    }

    /// The scheduler, built from a model's config.
    public func make(_ config: SchedulerConfig) throws -> Scheduler {
        try Schedulers.make(className: className, config: config.overriding(overrides))
    }
}

/// Building schedulers by diffusers class name.
public enum Schedulers {
    /// Every diffusers class this module implements.
    public static let classNames = [
        "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
        "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler",
        "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
    ]

    /// The scheduler a CLI name picks, from the model's config.
    public static func make(named name: String, config: SchedulerConfig) throws -> Scheduler {
        try SchedulerName(parsing: name).make(config)
    }

    /// The model's own scheduler: the class its config names in `_class_name`.
    public static func make(config: SchedulerConfig) throws -> Scheduler {
        guard let name = config.className else {
            throw SchedulerError.invalidConfig(origin: config.origin, detail: "no _class_name says which scheduler to build")
        }
        return try make(className: name, config: config.forOwnClass)
    }

    /// `<className>.from_config(config)`.
    public static func make(className: String, config: SchedulerConfig) throws -> Scheduler {
        switch className {
        case "DDIMScheduler": return try DDIMScheduler(config: config)
        case "DDPMScheduler": return try DDPMScheduler(config: config)
        case "PNDMScheduler": return try PNDMScheduler(config: config)
        case "EulerDiscreteScheduler": return try EulerDiscreteScheduler(config: config)
        case "EulerAncestralDiscreteScheduler": return try EulerAncestralDiscreteScheduler(config: config)
        case "HeunDiscreteScheduler": return try HeunDiscreteScheduler(config: config)
        case "KDPM2DiscreteScheduler": return try KDPM2DiscreteScheduler(config: config)
        case "KDPM2AncestralDiscreteScheduler": return try KDPM2AncestralDiscreteScheduler(config: config)
        case "LMSDiscreteScheduler": return try LMSDiscreteScheduler(config: config)
        case "DPMSolverMultistepScheduler": return try DPMSolverMultistepScheduler(config: config)
        case "DPMSolverSinglestepScheduler": return try DPMSolverSinglestepScheduler(config: config)
        case "DPMSolverSDEScheduler": return try DPMSolverSDEScheduler(config: config)
        case "DEISMultistepScheduler": return try DEISMultistepScheduler(config: config)
        case "UniPCMultistepScheduler": return try UniPCMultistepScheduler(config: config)
        case "LCMScheduler": return try LCMScheduler(config: config)
        case "TCDScheduler": return try TCDScheduler(config: config)
        case "EDMEulerScheduler": return try EDMEulerScheduler(config: config)
        case "EDMDPMSolverMultistepScheduler": return try DPMSolverMultistepScheduler.edm(config: config)
        default:
            throw SchedulerError.unsupportedClass(name: className, origin: config.origin, valid: classNames)
        }
    }
}
