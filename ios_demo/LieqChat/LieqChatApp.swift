import SwiftUI

@main
struct LieqChatApp: App {
  var body: some Scene {
    WindowGroup { ContentView() }
  }
}
