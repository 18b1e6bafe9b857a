/// Why a model could not be found or opened. Every case names what is missing or wrong: the
/// file, the folder, the component, the tensor. Errors of the files themselves (unreadable,
/// invalid JSON, corrupt safetensors) come as `FileError` / `SafeTensorsError`, which name the file.
public enum ModelSourceError: Error, CustomStringConvertible, Equatable {
    /// Neither a file or folder nor a repo id.
    case notFound(location: String, detail: String)
    /// A repo id that the Hugging Face cache does not hold (or holds only in part).
    case notInCache(repo: String, cache: String, detail: String)
    /// A folder without `model_index.json`.
    case notAPipeline(folder: String, detail: String)
    /// `model_index.json` (or another config) lacks a key or has one of the wrong kind.
    case invalidConfig(file: String, detail: String)
    /// `model_index.json` lists a component whose folder is not there.
    case missingComponentFolder(component: String, className: String, folder: String, modelIndex: String)
    /// A file a component needs is not there (`config.json`, `scheduler_config.json`, `merges.txt`, ...).
    case missingFile(component: String, path: String)
    /// A component folder with no weights file that can be read.
    case missingWeights(component: String, folder: String, expected: [String], found: [String])
    /// A file in the cache that is a link to a blob that is not there (an interrupted download).
    case brokenLink(path: String, target: String)
    /// A `variant` that no component has, or several variants and none chosen.
    case variant(detail: String)
    /// Two files that disagree (a config's `_class_name` and `model_index.json`, a checkpoint and a config).
    case inconsistent(detail: String)
    /// A component the caller asked for that this model does not have.
    case missingComponent(component: String, model: String, detail: String)
    /// A single-file checkpoint whose keys cannot be mapped to the diffusers names.
    case checkpointLayout(file: String, detail: String)
    /// Something this engine does not open (a refiner, an inpainting UNet, ...).
    case unsupported(location: String, detail: String)

    public var description: String {
        switch self {
        case let .notFound(location, detail):
            return "\(location): \(detail)"
        case let .notInCache(repo, cache, detail):
            return "\(repo): not found in the Hugging Face cache at \(cache); this tool never downloads (\(detail))"
        case let .notAPipeline(folder, detail):
            return "\(folder): not a diffusers pipeline folder: \(detail)"
        case let .invalidConfig(file, detail):
            return "\(file): \(detail)"
        case let .missingComponentFolder(component, className, folder, modelIndex):
            return "\(modelIndex) lists the component '\(component)' (\(className)) but its folder \(folder) is missing"
        case let .missingFile(component, path):
            return "component '\(component)': \(path) is missing"
        case let .missingWeights(component, folder, expected, found):
            let seen = found.isEmpty ? "the folder holds no files" : "the folder holds " + found.prefix(8).joined(separator: ", ")
                + (found.count > 8 ? " and \(found.count - 8) more" : "")
            return "component '\(component)': no weights in \(folder) (expected \(expected.joined(separator: " or ")); \(seen)"
        case let .brokenLink(path, target):
            return "\(path): links to \(target), which is missing (an interrupted download?)"
        case let .variant(detail):
            return detail
        case let .inconsistent(detail):
            return detail
        case let .missingComponent(component, model, detail):
            return "\(model) has no component '\(component)'\(detail.isEmpty ? "" : ": " + detail)"
        case let .checkpointLayout(file, detail):
            return "\(file): \(detail)"
        case let .unsupported(location, detail):
            return "\(location): \(detail)"
        }
    }
}
