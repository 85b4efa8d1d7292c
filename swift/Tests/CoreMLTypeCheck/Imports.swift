// The Core ML wrappers of Sources/StableDiffusion/CoreML (linked here, not copied) compiled once more
// in a Linux-only module against Tests/CoreMLStandIn, Apple's Core ML signatures: a misspelled or
// mistyped Core ML call fails `swift build`. In the library they are inside StableDiffusion; here
// they see its public API through this import.
@_exported import StableDiffusion
