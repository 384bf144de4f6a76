package org.lieq.demo

import java.io.File
import org.json.JSONArray
import org.json.JSONObject

/**
 * The bundle files and manifest fields this app reads. Every name must be listed in
 * lieq_export/bundle_contract.json: tests/test_contract.py parses the string literals used
 * as file names in `File(dir, <literal>)` and as keys of the org.json getters on `manifest.`,
 * `layer.` and `versions.` below, and fails when one is missing there (or when the exporter stops
 * writing it).
 */
const val BUNDLE_FORMAT = "lieq-export/pte-bundle/1"

/** The folder name the bundle is pushed to (see README.md). */
const val BUNDLE_FOLDER = "lieq"

data class LayerInfo(
    val index: Int,
    val gridBits: List<Int>, // the plan's width(s) for the layer's linears
    val storageBits: List<Int>, // bits per weight on disk (2/3-bit grids travel in int4)
    val groupSize: List<Int>,
)

data class BundleInfo(
    val dir: File,
    val format: String,
    val architecture: String,
    val pteBytes: Long,
    val maxContextLen: Int,
    val nLayers: Int,
    val layers: List<LayerInfo>,
    val executorchVersion: String?,
) {
    val modelFile: File get() = File(dir, "model.pte")
    val tokenizerFile: File get() = File(dir, "tokenizer.json")

    /** One line per layer group with the same widths, e.g. "L0-3: 4-bit (int4, g32)". */
    fun layerSummary(): String =
        layers.joinToString("\n") { l ->
            val grid = l.gridBits.joinToString("/")
            val stored = l.storageBits.joinToString("/")
            val group = l.groupSize.joinToString("/")
            "L${l.index}: $grid-bit grid, $stored bits stored, group $group"
        }

    fun header(): String =
        "$architecture, ${"%.1f".format(pteBytes / 1e6)} MB model.pte, $nLayers layers, " +
            "context $maxContextLen, ExecuTorch ${executorchVersion ?: "?"}" +
            if (format != BUNDLE_FORMAT) "\n(unexpected bundle format $format)" else ""

    companion object {
        fun load(dir: File): BundleInfo {
            val manifest = JSONObject(File(dir, "manifest.json").readText())
            val layers = manifest.getJSONArray("layers")
            val versions = manifest.getJSONObject("versions")
            return BundleInfo(
                dir = dir,
                format = manifest.getString("format"),
                architecture = manifest.getString("architecture"),
                pteBytes = manifest.getLong("pte_bytes"),
                maxContextLen = manifest.getInt("max_context_len"),
                nLayers = manifest.getInt("n_layers"),
                layers =
                    (0 until layers.length()).map { i ->
                        val layer = layers.getJSONObject(i)
                        LayerInfo(
                            index = layer.getInt("index"),
                            gridBits = layer.getJSONArray("grid_bits").ints(),
                            storageBits = layer.getJSONArray("storage_bits").ints(),
                            groupSize = layer.getJSONArray("group_size").ints(),
                        )
                    },
                executorchVersion = if (versions.isNull("executorch")) null else versions.getString("executorch"),
            )
        }
    }
}

private fun JSONArray.ints(): List<Int> = (0 until length()).map { getInt(it) }
