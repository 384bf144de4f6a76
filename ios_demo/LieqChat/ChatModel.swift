import ExecuTorchLLM
import Foundation

struct Message: Identifiable {
  let id = UUID()
  let fromUser: Bool
  var text: String
}

/// Runs ExecuTorch's TextRunner (ExecuTorchLLM) on a serial queue; UI state on the main actor.
@MainActor
final class ChatModel: ObservableObject {
  @Published var messages: [Message] = []
  @Published var status = "Looking for a bundle…"
  @Published var manifest: BundleManifest?
  @Published var lastRate: String?
  @Published var isBusy = true

  private var runner: TextRunner?
  private let queue = DispatchQueue(label: "org.lieq.runner", qos: .userInitiated)

  /// Documents/lieq: copy the bundle folder there (Finder / Files app, or see README.md).
  static var bundleDirectory: URL {
    FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0]
      .appendingPathComponent(bundleFolder)
  }

  func load() {
    let files = BundleFiles(directory: Self.bundleDirectory)
    guard FileManager.default.fileExists(atPath: files.model.path) else {
      status = "No bundle: copy model.pte, tokenizer.json and manifest.json to \(files.directory.path)"
      return
    }
    status = "Loading \(files.directory.lastPathComponent)…"
    queue.async {
      do {
        let manifest = try BundleManifest.load(files)
        let runner = TextRunner(modelPath: files.model.path, tokenizerPath: files.tokenizer.path)
        try runner.load()
        DispatchQueue.main.async {
          self.manifest = manifest
          self.runner = runner
          self.status = manifest.header
          self.isBusy = false
        }
      } catch {
        DispatchQueue.main.async { self.status = "Cannot load the bundle: \(error.localizedDescription)" }
      }
    }
  }

  func send(_ prompt: String) {
    guard let runner, let manifest, !isBusy, !prompt.isEmpty else { return }
    isBusy = true
    messages.append(Message(fromUser: true, text: prompt))
    messages.append(Message(fromUser: false, text: ""))
    let reply = messages.count - 1
    queue.async {
      var tokens = 0
      var firstToken: Date?
      let start = Date()
      var failure: String?
      do {
        // The .pte bundle carries no chat template: the prompt is completed as typed.
        // sequenceLength is the whole prompt + answer, bounded by the bundle's KV cache.
        runner.reset()
        try runner.generate(prompt, Config {
          $0.sequenceLength = manifest.maxContextLen
          $0.temperature = 0  // greedy, like `lieq-export chat`
          $0.isEchoEnabled = false  // stream only the new tokens
        }) { token in
          tokens += 1
          if firstToken == nil { firstToken = Date() }
          DispatchQueue.main.async { self.messages[reply].text += token }
        }
      } catch {
        failure = error.localizedDescription
      }
      let seconds = Date().timeIntervalSince(start)
      let first = firstToken.map { String(format: ", first token after %.0f ms", $0.timeIntervalSince(start) * 1000) } ?? ""
      let rate = failure.map { "generation failed: \($0)" }
        ?? String(format: "%d tokens in %.2f s, %.1f tok/s", tokens, seconds, Double(tokens) / max(seconds, 1e-9)) + first
      DispatchQueue.main.async {
        self.lastRate = rate
        self.isBusy = false
      }
    }
  }

  func stop() { runner?.stop() }
}
