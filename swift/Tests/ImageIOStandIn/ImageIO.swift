// A stand-in for Apple's Image I/O, for Linux only and for type-checking only (see
// Tests/CoreMLStandIn/CoreML.swift): exactly the members Sources/StableDiffusion/CoreML/ImageFile.swift
// uses, with the signatures of their pages under https://developer.apple.com/documentation/imageio/ .
import CoreGraphics
import Foundation

/// CoreFoundation's CFURL and CFDictionary, toll-free bridged to URL and NSDictionary on Apple
/// platforms (so `url as CFURL` compiles there); Linux has no such bridge, so here they are aliases.
public typealias CFURL = URL
public typealias CFDictionary = NSDictionary

/// .../cgimagesource — `class CGImageSource`
public final class CGImageSource {}

/// .../cgimagesourcecreatewithurl(_:_:) — `func CGImageSourceCreateWithURL(_ url: CFURL, _ options: CFDictionary?) -> CGImageSource?`
public func CGImageSourceCreateWithURL(_ url: CFURL, _ options: CFDictionary?) -> CGImageSource? { fatalError("stand-in") }

/// .../cgimagesourcecreateimageatindex(_:_:_:) — `func CGImageSourceCreateImageAtIndex(_ isrc: CGImageSource, _ index: Int, _ options: CFDictionary?) -> CGImage?`
public func CGImageSourceCreateImageAtIndex(_ isrc: CGImageSource, _ index: Int, _ options: CFDictionary?) -> CGImage? {
    fatalError("stand-in")
}
