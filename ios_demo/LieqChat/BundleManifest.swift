import Foundation

/// The bundle files and manifest fields this app reads. Every name must be listed in
/// lieq_export/bundle_contract.json: tests/test_contract.py parses the string literals passed
/// to appendingPathComponent and those of the CodingKeys below (one explicit string per
/// key), and fails when one is missing there or the exporter stops writing it.
let bundleFormat = "lieq-export/pte-bundle/1"

/// The folder in Documents the bundle is copied to (see README.md).
let bundleFolder = "lieq"

struct BundleFiles {
  let directory: URL
  var model: URL { directory.appendingPathComponent("model.pte") }
  var tokenizer: URL { directory.appendingPathComponent("tokenizer.json") }
  var manifest: URL { directory.appendingPathComponent("manifest.json") }
}

struct BundleManifest: Decodable {
  let format: String
  let architecture: String
  let pteBytes: Int
  let maxContextLen: Int
  let nLayers: Int
  let layers: [LayerEntry]
  let versions: Versions

  enum CodingKeys: String, CodingKey {
    case format = "format"
    case architecture = "architecture"
    case pteBytes = "pte_bytes"
    case maxContextLen = "max_context_len"
    case nLayers = "n_layers"
    case layers = "layers"
    case versions = "versions"
  }

  static func load(_ files: BundleFiles) throws -> BundleManifest {
    try JSONDecoder().decode(BundleManifest.self, from: Data(contentsOf: files.manifest))
  }

  var header: String {
    let mb = String(format: "%.1f", Double(pteBytes) / 1e6)
    var s = "\(architecture), \(mb) MB model.pte, \(nLayers) layers, context \(maxContextLen), "
      + "ExecuTorch \(versions.executorch ?? "?")"
    if format != bundleFormat { s += "\n(unexpected bundle format \(format))" }
    return s
  }
}

struct LayerEntry: Decodable, Identifiable {
  let index: Int
  let gridBits: [Int]  // the plan's width(s) for the layer's linears
  let storageBits: [Int]  // bits per weight on disk (2/3-bit grids travel in int4)
  let groupSize: [Int]
  var id: Int { index }

  enum CodingKeys: String, CodingKey {
    case index = "index"
    case gridBits = "grid_bits"
    case storageBits = "storage_bits"
    case groupSize = "group_size"
  }

  var summary: String {
    let j = { (v: [Int]) in v.map(String.init).joined(separator: "/") }
    return "L\(index): \(j(gridBits))-bit grid, \(j(storageBits)) bits stored, group \(j(groupSize))"
  }
}

struct Versions: Decodable {
  let executorch: String?

  enum CodingKeys: String, CodingKey {
    case executorch = "executorch"
  }
}
