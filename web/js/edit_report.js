// attention-edit: shows the Edit Sampler's edit report (its UI output `text`, from the V3 PreviewText) on the node.
// Both frontends the pack supports: 1.48.x has the text-preview widget of its Preview Any node
// (window.comfyAPI.textPreviewWidgets); 1.30.x gets a read-only multiline STRING widget, as its Preview Any does.
const { app } = window.comfyAPI.app;
const NODE = "AttnEdit_EditSampler";
const WIDGET = "edit_report";
const WAITING = "The edit report appears here after a run: which branches ran, the mask's coverage, how far the " +
  "target moved from the source, and hints when the edit is likely to do nothing.";

function addReportWidget(node) {
  const { ComfyWidgets } = window.comfyAPI.widgets;
  const widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
  widget.serialize = false; // not saved in widgets_values
  if (widget.options) widget.options.serialize = false; // and not sent in the API prompt
  if (widget.element) {
    widget.element.readOnly = true;
    widget.element.placeholder = WAITING;
    widget.element.dataset.attnEditReport = "1";
  }
  widget.value = "";
  return widget;
}

function showReport(node, output) {
  const text = output && output.text ? [].concat(output.text).join("\n") : "";
  const widget = node.widgets && node.widgets.find((w) => w.name === WIDGET);
  if (!widget) return;
  widget.value = text;
  if (widget.element) widget.element.value = text;
  node.setDirtyCanvas && node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "attention_edit.EditReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = created ? created.apply(this, arguments) : undefined;
      addReportWidget(this);
      return r;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      if (executed) executed.apply(this, arguments);
      showReport(this, output);
    };
  },
});
