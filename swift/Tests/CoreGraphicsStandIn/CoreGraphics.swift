// A stand-in for Apple's Core Graphics, for Linux only and for type-checking only (see
// Tests/CoreMLStandIn/CoreML.swift): exactly the members Sources/StableDiffusion/CoreML/ImageFile.swift
// uses, with the signatures of their pages under https://developer.apple.com/documentation/coregraphics/ .
// CGRect comes from Linux's Foundation, as on Apple platforms it comes through CoreGraphics.
import Foundation

/// .../cgimage — `class CGImage`
public final class CGImage {
    /// .../cgimage/width — `var width: Int { get }`
    public var width: Int { fatalError("stand-in") }
    /// .../cgimage/height — `var height: Int { get }`
    public var height: Int { fatalError("stand-in") }
}

/// .../cgcolorspace — `class CGColorSpace`
public final class CGColorSpace {}

/// .../cgcolorspacecreatedevicergb() — `func CGColorSpaceCreateDeviceRGB() -> CGColorSpace`
public func CGColorSpaceCreateDeviceRGB() -> CGColorSpace { fatalError("stand-in") }

/// .../cgimagealphainfo — `enum CGImageAlphaInfo : UInt32, @unchecked Sendable`
public enum CGImageAlphaInfo: UInt32, @unchecked Sendable {
    /// .../cgimagealphainfo/noneskiplast
    case noneSkipLast = 5
}

/// .../cgcontext — `class CGContext`
public final class CGContext {
    /// .../cgcontext/init(data:width:height:bitspercomponent:bytesperrow:space:bitmapinfo:)-... —
    /// `init?(data: UnsafeMutableRawPointer?, width: Int, height: Int, bitsPerComponent: Int, bytesPerRow: Int, space: CGColorSpace, bitmapInfo: UInt32)`
    public init?(data: UnsafeMutableRawPointer?, width: Int, height: Int, bitsPerComponent: Int, bytesPerRow: Int,
                 space: CGColorSpace, bitmapInfo: UInt32) { fatalError("stand-in") }

    /// .../cgcontext/draw(_:in:bytiling:) — `func draw(_ image: CGImage, in rect: CGRect, byTiling: Bool = false)`
    public func draw(_ image: CGImage, in rect: CGRect, byTiling: Bool = false) { fatalError("stand-in") }
}
