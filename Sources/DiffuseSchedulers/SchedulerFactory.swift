import DiffuseCore

/// The schedulers the command line offers. Each is built from the model's `scheduler_config.json`
/// as diffusers' `Cls.from_config(pipe.scheduler.config, **overrides)` builds it: keys the file
/// lacks take the class's own defaults, and the name may fix a few keys.
public enum SchedulerName: String, CaseIterable, Sendable {
    case ddim
    case pndm
    case euler
    case eulerAncestral = "euler-a"
    case dpmPlusPlus2M = "dpm++2m"
    case dpmPlusPlus2MKarras = "dpm++2m-karras"
    case unipc
    case lcm

    /// A name as typed (case-insensitive); an unknown name is an error listing the valid ones.
    public init(parsing name: String) throws {
        guard let value = SchedulerName(rawValue: name.lowercased()) else {
            throw SchedulerError.unknownScheduler(name: name, valid: SchedulerName.allCases.map(\.rawValue))
        }
        self = value
    }

    /// The diffusers class behind the name.
    public var className: String {
        switch self {
        case .ddim: return "DDIMScheduler"
        case .pndm: return "PNDMScheduler"
        case .euler: return "EulerDiscreteScheduler"
        case .eulerAncestral: return "EulerAncestralDiscreteScheduler"
        case .dpmPlusPlus2M, .dpmPlusPlus2MKarras: return "DPMSolverMultistepScheduler"
        case .unipc: return "UniPCMultistepScheduler"
        case .lcm: return "LCMScheduler"
        }
    }

    /// The config keys the name fixes on top of the model's config ("2M" is DPM-Solver++ of order 2).
    public var overrides: [String: JSON] {
        switch self {
        case .dpmPlusPlus2M:
            return ["algorithm_type": .string("dpmsolver++"), "solver_order": .number(2)]
        case .dpmPlusPlus2MKarras:
            return ["algorithm_type": .string("dpmsolver++"), "solver_order": .number(2), "use_karras_sigmas": .bool(true)]
        default:
            return [:]
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
        "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
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
        case "PNDMScheduler": return try PNDMScheduler(config: config)
        case "EulerDiscreteScheduler": return try EulerDiscreteScheduler(config: config)
        case "EulerAncestralDiscreteScheduler": return try EulerAncestralDiscreteScheduler(config: config)
        case "DPMSolverMultistepScheduler": return try DPMSolverMultistepScheduler(config: config)
        case "UniPCMultistepScheduler": return try UniPCMultistepScheduler(config: config)
        case "LCMScheduler": return try LCMScheduler(config: config)
        default:
            throw SchedulerError.unsupportedClass(name: className, origin: config.origin, valid: classNames)
        }
    }
}
