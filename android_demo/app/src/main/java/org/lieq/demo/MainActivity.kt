package org.lieq.demo

import android.app.Activity
import android.graphics.Typeface
import android.os.Bundle
import android.view.ViewGroup.LayoutParams.MATCH_PARENT
import android.view.ViewGroup.LayoutParams.WRAP_CONTENT
import android.view.inputmethod.EditorInfo
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import java.util.concurrent.Executors
import org.json.JSONObject
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * One screen: the bundle's manifest (architecture, size, per-layer bits) on top, the chat
 * below, tokens/s after every answer. The model runs on one worker thread; ExecuTorch's
 * LlmModule calls back on that thread and the UI is updated with runOnUiThread.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private var module: LlmModule? = null
    private var bundle: BundleInfo? = null
    @Volatile private var generating = false

    private lateinit var header: TextView
    private lateinit var chat: TextView
    private lateinit var scroll: ScrollView
    private lateinit var input: EditText
    private lateinit var send: Button

    /** Where `adb push` puts the bundle (see README.md); the first folder with a model.pte wins. */
    private fun bundleCandidates(): List<File> =
        listOfNotNull(getExternalFilesDir(null)?.let { File(it, BUNDLE_FOLDER) }, File("/data/local/tmp", BUNDLE_FOLDER))

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val pad = (12 * resources.displayMetrics.density).toInt()
        header = TextView(this).apply { typeface = Typeface.MONOSPACE; textSize = 12f }
        chat = TextView(this).apply { textSize = 16f; setTextIsSelectable(true) }
        scroll = ScrollView(this).apply { addView(chat) }
        input = EditText(this).apply {
            hint = "Message"
            imeOptions = EditorInfo.IME_ACTION_SEND
            setSingleLine()
            setOnEditorActionListener { _, id, _ -> (id == EditorInfo.IME_ACTION_SEND).also { if (it) onSend() } }
        }
        send = Button(this).apply { text = "Send"; isEnabled = false; setOnClickListener { onSend() } }
        val row = LinearLayout(this).apply {
            orientation = LinearLayout.HORIZONTAL
            addView(input, LinearLayout.LayoutParams(0, WRAP_CONTENT, 1f))
            addView(send, LinearLayout.LayoutParams(WRAP_CONTENT, WRAP_CONTENT))
        }
        setContentView(
            LinearLayout(this).apply {
                orientation = LinearLayout.VERTICAL
                setPadding(pad, pad, pad, pad)
                addView(header, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT))
                addView(scroll, LinearLayout.LayoutParams(MATCH_PARENT, 0, 1f))
                addView(row, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT))
            }
        )
        loadBundle()
    }

    private fun loadBundle() {
        val dir = bundleCandidates().firstOrNull { File(it, "model.pte").isFile }
        if (dir == null) {
            header.text = "No bundle found. Push one to:\n" + bundleCandidates().joinToString("\n") { it.path }
            return
        }
        header.text = "Loading ${dir.path} ..."
        worker.execute {
            try {
                val info = BundleInfo.load(dir)
                // temperature 0: greedy, like `lieq-export chat`
                val m = LlmModule(info.modelFile.path, info.tokenizerFile.path, 0.0f)
                // load() returns an ExecuTorch error code (0 = Ok) in the Java API; releases whose
                // LlmModule is written in Kotlin return Unit and throw instead. Accept both.
                val status: Any = m.load()
                if (status is Int && status != 0) error("LlmModule.load() failed with error $status")
                module = m
                bundle = info
                runOnUiThread {
                    header.text = info.header() + "\n" + info.layerSummary()
                    send.isEnabled = true
                }
            } catch (e: Throwable) {
                runOnUiThread { header.text = "Cannot load ${dir.path}: ${e.message}" }
            }
        }
    }

    private fun onSend() {
        val prompt = input.text.toString().trim()
        val m = module ?: return
        val info = bundle ?: return
        if (prompt.isEmpty() || generating) return
        input.setText("")
        generating = true
        send.isEnabled = false
        append("\n\nYou: $prompt\nModel: ")
        worker.execute { answer(m, info, prompt) }
    }

    private fun answer(m: LlmModule, info: BundleInfo, prompt: String) {
        var pieces = 0
        var statsJson: String? = null
        val start = System.nanoTime()
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                pieces++
                runOnUiThread { append(result) }
            }

            override fun onStats(stats: String) {
                statsJson = stats
            }
        }
        val line =
            try {
                // The whole prompt + answer must fit the bundle's KV cache: seqLen is the total
                // length (LlmModule does not forward a separate max-new-tokens in 1.5).
                // Without a chat template the prompt is completed as typed (the .pte bundle
                // carries no template). echo = false: stream only the new tokens.
                m.resetContext()
                val status: Any = m.generate(prompt, info.maxContextLen, callback, false)
                if (status is Int && status != 0) "[generation failed: error $status]"
                else rateLine(statsJson, pieces, (System.nanoTime() - start) / 1e9)
            } catch (e: Throwable) {
                "[generation failed: ${e.message}]"
            }
        runOnUiThread {
            append("\n$line")
            generating = false
            send.isEnabled = true
        }
    }

    /** tokens/s from the runner's stats JSON (ExecuTorch extension/llm/runner/stats.h), else wall clock. */
    private fun rateLine(statsJson: String?, pieces: Int, seconds: Double): String {
        try {
            if (statsJson != null) {
                val stats = JSONObject(statsJson)
                val tokens = stats.getInt("generated_tokens") + 1 // + the token the prefill sampled
                val decodeMs = stats.getLong("inference_end_ms") - stats.getLong("prompt_eval_end_ms")
                val firstMs = stats.getLong("first_token_ms") - stats.getLong("inference_start_ms")
                val decode = if (decodeMs > 0) "%.1f".format(1000.0 * (tokens - 1) / decodeMs) else "?"
                return "[$tokens tokens, $decode tok/s decode, first token after $firstMs ms]"
            }
        } catch (_: Exception) {
        }
        return "[$pieces pieces in ${"%.2f".format(seconds)} s, ${"%.1f".format(pieces / seconds)} tok/s]"
    }

    private fun append(text: String) {
        chat.append(text)
        scroll.post { scroll.fullScroll(ScrollView.FOCUS_DOWN) }
    }

    override fun onDestroy() {
        module?.stop()
        worker.shutdown()
        super.onDestroy()
    }
}
