import SwiftUI

struct ContentView: View {
  @StateObject private var model = ChatModel()
  @State private var draft = ""

  var body: some View {
    VStack(alignment: .leading, spacing: 8) {
      Text(model.status).font(.footnote.monospaced())
      if let manifest = model.manifest {
        DisclosureGroup("Bits per layer (\(manifest.layers.count))") {
          ForEach(manifest.layers) { Text($0.summary).font(.caption.monospaced()) }
        }
      }
      ScrollViewReader { proxy in
        ScrollView {
          LazyVStack(alignment: .leading, spacing: 6) {
            ForEach(model.messages) { m in
              Text((m.fromUser ? "You: " : "Model: ") + m.text)
                .foregroundStyle(m.fromUser ? .secondary : .primary)
                .textSelection(.enabled)
                .id(m.id)
            }
          }
        }
        .onChange(of: model.messages.last?.text) {
          if let id = model.messages.last?.id { proxy.scrollTo(id, anchor: .bottom) }
        }
      }
      if let rate = model.lastRate { Text(rate).font(.caption.monospaced()) }
      HStack {
        TextField("Message", text: $draft).textFieldStyle(.roundedBorder).onSubmit(send)
        if model.isBusy && model.manifest != nil {
          Button("Stop") { model.stop() }
        } else {
          Button("Send", action: send).disabled(model.manifest == nil || draft.isEmpty)
        }
      }
    }
    .padding()
    .task { model.load() }
  }

  private func send() {
    let text = draft.trimmingCharacters(in: .whitespacesAndNewlines)
    draft = ""
    model.send(text)
  }
}
