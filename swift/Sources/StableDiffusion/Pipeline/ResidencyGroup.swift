import Foundation

/// A model that can drop its weights and load them again on next use.
public protocol ResidentModel: AnyObject {
    func unload()
}

/// Models of which only one stage may be resident at a time (the CLI's --reduce-memory): loading a
/// model of another stage unloads the rest, so the UNet stays loaded across its steps (both chunks
/// are one stage) while the text encoder and decoders come and go around it.
public final class ResidencyGroup: @unchecked Sendable {
    private struct Member {
        weak var model: (any ResidentModel)?
        let stage: String
    }
    private var members: [Member] = []
    private let lock = NSLock()

    public init() {}

    public func register(_ model: any ResidentModel, stage: String) {
        lock.lock()
        members.append(Member(model: model, stage: stage))
        lock.unlock()
    }

    /// Call before loading a model of `stage`.
    public func willLoad(stage: String) {
        lock.lock()
        let others = members.filter { $0.stage != stage }.compactMap(\.model)
        lock.unlock()
        others.forEach { $0.unload() }
    }
}
