import DiffuseCore
import Testing

@Suite("Resize")
struct ResizeTests {
    @Test("resized(width:height:filter:) equals PIL's Image.resize exactly")
    func againstPillow() throws {
        let cases = ImageFixtures.cases("resize")
        #expect(cases.contains { $0["filter"]?.string == "lanczos" })
        for c in cases {
            let source = try Image.read(ImageFixtures.path(c["source"]!.string!))
            let filter = ResampleFilter(rawValue: c["filter"]!.string!)!
            let box = c["box"]?.array.map { b in
                ResampleBox(left: Float(b[0].double!), top: Float(b[1].double!), right: Float(b[2].double!), bottom: Float(b[3].double!))
            }
            let out = source.resized(width: c["width"]!.int!, height: c["height"]!.int!, filter: filter, box: box)
            let expected = try ImageFixtures.image(c["expected"]!.string!)
            let diff = maxDifference(out, expected)
            #expect(diff == 0, "\(c["source"]!.string!) → \(c["width"]!.int!)x\(c["height"]!.int!) \(filter) box \(box.map { "\($0)" } ?? "-"): max difference \(diff.map(String.init) ?? "shape mismatch")")
        }
    }

    @Test("same size is the identity; flat images stay flat at any size", arguments: ResampleFilter.allCases)
    func invariants(filter: ResampleFilter) {
        let flat = Image(width: 19, height: 7, channels: 3, pixels: [UInt8](repeating: 201, count: 19 * 7 * 3))
        for (w, h) in [(5, 3), (40, 21), (19, 2), (1, 1), (64, 7)] {
            #expect(flat.resized(width: w, height: h, filter: filter).pixels.allSatisfy { $0 == 201 }, "\(w)x\(h)")
        }
        var rng = TestRandom(seed: 3)
        let noise = Image(width: 9, height: 4, channels: 4, pixels: rng.bytes(9 * 4 * 4))
        #expect(noise.resized(width: 9, height: 4, filter: filter) == noise)
    }

    @Test("diffusers' resample names map to PIL filters")
    func names() {
        #expect(ResampleFilter(diffusersName: "lanczos") == .lanczos)
        #expect(ResampleFilter(diffusersName: "bilinear") == .bilinear)
        #expect(ResampleFilter(diffusersName: "nearest-exact") == nil)
    }
}
