"""The Streamlit page: widgets and layout only; every computation is a library call routed
through `cnnscan.app.core`, `pictures`, `exports` and `jobs`. Start it with `cnnscan app`."""

from __future__ import annotations

import streamlit as st

import cnnscan
from cnnscan import render
from cnnscan.app import core, exports, jobs, pictures, sources
from cnnscan.concept.page import footprint_picture, heatmap_picture
from cnnscan.errors import CnnscanError
from cnnscan.images import sample_names
from cnnscan.learned import depth_layers
from cnnscan.methods import get_method, list_methods
from cnnscan.models import DEFAULT_MODEL

CONFIG = sources.AppConfig.from_env()
POLL_SECONDS = 0.5
CELL_PX = 300  # at most; narrower columns shrink the cells


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def shared_model(name: str, weights: str, path: str | None, key: str) -> cnnscan.Model:
    """One model object for every session (`key` changes when a weights file changes)."""
    return sources.load_choice(sources.ModelChoice(name, weights, path), CONFIG)


def sidebar_model() -> tuple[cnnscan.Model, str]:
    st.header("Model")
    name = st.selectbox(
        "Architecture",
        sources.model_names(),
        key="model_name",
        help="The bundled EfficientNet-Lite0 has real ImageNet weights and needs no download; "
        "torchvision, timm and Keras-application models download theirs when online.",
    )
    choices = ["imagenet", "random"] + (["file"] if CONFIG.allow_local_files else [])
    names = {
        "imagenet": "ImageNet" + (" (bundled)" if name == DEFAULT_MODEL else " (download)"),
        "random": "random (untrained)",
        "file": "a weights file on the server",
    }
    weights = st.radio("Weights", choices, format_func=names.__getitem__, key="weights")
    path = None
    if weights == "file":
        path = st.text_input(
            "Weights file (.pt, .pth, .safetensors)",
            key="weights_path",
            help="A state dict on the server, read with weights_only=True (never unpickled).",
        )
    try:
        choice = sources.ModelChoice(name, weights, path)
        if weights == "file":
            sources.weights_file(path or "", CONFIG)
        model = shared_model(name, weights, path, choice.key())
    except CnnscanError as e:
        st.error(str(e))
        st.stop()
    return model, choice.key()


def _uploaded() -> None:
    if st.session_state.get("upload") is not None:
        st.session_state["image_source"] = "upload"


def sidebar_picture() -> sources.SourceImage:
    st.header("Image")
    source = st.radio("Picture", ["sample", "upload"], key="image_source", horizontal=True)
    names = sample_names()
    sample = st.selectbox(
        "Sample photo", names, index=names.index(sources.DEFAULT_SAMPLE), key="sample"
    )
    upload = st.file_uploader(
        f"Upload a picture (JPEG, PNG, WebP, BMP, TIFF; up to {CONFIG.max_upload_mb} MB)",
        type=list(sources.UPLOAD_TYPES),
        key="upload",
        max_upload_size=CONFIG.max_upload_mb,
        on_change=_uploaded,
    )
    if source == "upload" and upload is not None:
        decoded = st.session_state.get("decoded")
        if decoded is None or decoded[0] != upload.file_id:
            try:
                decoded = (
                    upload.file_id,
                    sources.read_upload(upload.name, upload.getvalue(), CONFIG.max_upload_mb),
                )
            except CnnscanError as e:
                decoded = (upload.file_id, str(e))
            st.session_state["decoded"] = decoded
        if isinstance(decoded[1], sources.SourceImage):
            return decoded[1]
        st.session_state["upload_error"] = decoded[1]
    elif source == "upload":
        st.info("Upload a picture; the sample photo is shown until then.")
    return sources.sample_picture(sample)


def workspace(model: cnnscan.Model, model_key: str, picture: sources.SourceImage) -> core.Workspace:
    ws = st.session_state.get("workspace")
    if ws is None or ws.key != (model_key, picture.digest):
        ws = core.Workspace(model, model_key, picture)
        st.session_state["workspace"] = ws
        st.session_state["pngs"] = {}
    return ws


def header(ws: core.Workspace) -> None:
    left, right = st.columns([1, 2])
    left.image(
        ws.view,
        caption=f"{ws.picture.name}, as the model sees it",
        width=224,
        output_format="PNG",
        alt="model input",
    )
    with right, st.spinner("Running the model…"):
        rows = ws.predictions(5)
    right.markdown(f"**Top-5 of {ws.model.name}**")
    right.caption(f"Preprocessing: {ws.model.preprocessing.describe(origin=True)}")
    right.table(
        [
            {
                "rank": row["rank"],
                "class": row["class_id"],
                "label": row["label"],
                "probability": f"{row['probability']:.3f}",
            }
            for row in rows
        ],
        hide_index=True,
    )


# -- explanations ---------------------------------------------------------------------------------
def choose_targets(ws: core.Workspace) -> list[int]:
    mode = st.radio("Targets", ["top-k", "classes"], key="target_mode", horizontal=True)
    if mode == "top-k":
        most = max(1, min(10, len(ws.model.labels)))
        k = st.slider("k", 1, most, 1, key="top_k", help="Explain the k most likely classes.")
        return ws.top_classes(k)
    labels = ws.model.labels
    options = [f"{i}: {label}" for i, label in enumerate(labels)]
    top1 = ws.top_classes(1)[0]
    chosen = st.multiselect(
        "Classes (type to search)", options, default=[options[top1]], key="classes"
    )
    return [int(text.split(":", 1)[0]) for text in chosen] or [top1]


def choose_methods() -> list[str]:
    families = list(dict.fromkeys(info.family for info in list_methods()))
    defaults = core.first_screen_methods()
    chosen: list[str] = []
    for column, family in zip(st.columns(len(families)), families, strict=True):
        infos = list_methods(family)
        described = "\n".join(
            f"- **{i.name}**: {i.description} ({i.cost or 'cost not stated'})"
            + ("" if i.in_default_scan else " — slow")
            for i in infos
        )
        chosen += column.multiselect(
            f"{family} methods",
            [i.name for i in infos],
            default=[n for n in defaults if n in {i.name for i in infos}],
            key=f"methods_{family}",
            help=described,
            format_func=lambda n: n if get_method(n).in_default_scan else f"{n} (slow)",
        )
    return chosen


def choose_options(methods: list[str]) -> dict[str, str | None]:
    """Each method's options as canonical JSON; None where the typed options are invalid
    (the method is left out of the grid and the message shown)."""
    options: dict[str, str | None] = {}
    tunable = [m for m in methods if set(get_method(m).options()) - {"layer"}]
    if not tunable:
        return options
    with st.expander("Method options"):
        for name in tunable:
            info = get_method(name)
            defaults = {k: v for k, v in info.options().items() if k != "layer"}
            text = st.text_input(
                f"{name} (JSON)",
                value="{}",
                key=f"options_{name}",
                help=f"Defaults: {defaults}",
            )
            try:
                options[name] = core.parse_options(info, text)
            except CnnscanError as e:
                st.error(f"{e} ({name} is left out until this is fixed)")
                options[name] = None
    return options


def explanations(ws: core.Workspace) -> tuple | None:
    """The controls and the grid; returns the run (columns, targets, cells) it shows."""
    top = st.columns([2, 3])
    with top[0]:
        targets = choose_targets(ws)
    with top[1]:
        methods = choose_methods()
    layers: list[str] = []
    if any("layer" in get_method(m).options() for m in methods):
        layers = st.multiselect(
            "Layers (methods that read a layer)",
            ws.spatial_layers(),
            key="layers",
            help=f"Empty: each method's default layer ({ws.default_layer()}). Several layers "
            "give one column per layer.",
        )
    options = choose_options(methods)
    methods = [m for m in methods if options.get(m, "{}") is not None]
    view_col, alpha_col, cmap_col = st.columns(3)
    view = view_col.radio("View", pictures.CELL_VIEWS, key="view", horizontal=True)
    alpha = alpha_col.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="alpha")
    cmaps = list(render.COLORMAPS)
    cmap = cmap_col.selectbox("Colour map", cmaps, index=cmaps.index("jet"), key="cmap")
    if not methods:
        st.info("Pick at least one method (with valid options).")
        return None
    columns = core.columns_for(methods, layers, {k: v for k, v in options.items() if v})
    cells, errors = {}, {}
    progress = st.progress(0.0)
    for i, column in enumerate(columns):
        progress.progress(i / len(columns), text=f"{column.title} ({i + 1}/{len(columns)})")
        try:
            for target, cell in zip(targets, ws.explain(column, targets), strict=True):
                cells[(column, target)] = cell
        except CnnscanError as e:
            errors[column] = str(e)
        except Exception as e:  # a model the method cannot handle: say so, keep the page
            errors[column] = f"{type(e).__name__}: {e}"
    progress.empty()
    grid(ws, columns, targets, cells, errors, view, alpha, cmap)
    done = [c for c in columns if c not in errors]
    return (done, targets, cells) if done else None


def grid(
    ws: core.Workspace,
    columns: list[core.Column],
    targets: list[int],
    cells: dict,
    errors: dict,
    view: str,
    alpha: float,
    cmap: str,
) -> None:
    """Rows = targets, columns = methods: each cell its picture and a PNG download; below,
    the whole run as a zip or an HTML report (built only when asked for)."""
    rows = ws.prediction_rows(targets)
    widths = [1] + [2] * len(columns)
    for slot, column in zip(st.columns(widths)[1:], columns, strict=True):
        slot.markdown(f"**{column.title}**")
        if column in errors:
            slot.error(errors[column])
    pngs: dict = st.session_state.setdefault("pngs", {})
    if len(pngs) > 400:
        pngs.clear()
    shown = {}
    for row in rows:
        target = row["class_id"]
        slots = st.columns(widths)
        slots[0].markdown(f"**{row['label']}**  \nclass {target} · p = {row['probability']:.3f}")
        for slot, column in zip(slots[1:], columns, strict=True):
            if column in errors:
                continue
            key = (*ws.cell_key(column, target), view, alpha, cmap)
            if key not in pngs:
                rgb = pictures.cell_picture(
                    cells[(column, target)], view, ws.view, alpha=alpha, cmap=cmap
                )
                pngs[key] = pictures.picture_png(rgb)
            shown[(column, target)] = pngs[key]
            slot.image(
                pngs[key],
                width=CELL_PX,
                output_format="PNG",
                alt=f"{column.title} for {row['label']}",
            )
            slot.download_button(
                "PNG",
                pngs[key],
                file_name=f"{column.file_stem}_class{target}_{view}.png",
                mime="image/png",
                key=f"png|{column.file_stem}|{target}",
                on_click="ignore",
            )
    done = [c for c in columns if c not in errors]
    if not done:
        return
    settings = {"view": view, "opacity": alpha, "colour_map": cmap}
    left, right = st.columns(2)
    left.download_button(
        "Download the run (zip)",
        lambda: exports.run_zip(ws, done, targets, cells, shown, settings),
        file_name="cnnscan-run.zip",
        mime="application/zip",
        on_click="ignore",
        key="zip",
    )
    asked = st.session_state.get("eval_asked")  # the Evaluation tab's last request
    board = None
    if core.evaluation_available() and asked and asked[0] == targets[0] and asked[3] == tuple(done):
        board = asked  # its leaderboard goes into the report (cached: no new work)

    def report() -> bytes:
        from cnnscan.app import evaluation

        leaderboard = None
        if board is not None:
            target, steps, sanity, _ = board
            rows = evaluation.leaderboard_rows(ws, done, cells, target, steps=steps, sanity=sanity)
            leaderboard = (rows, evaluation.report_options(steps, sanity))
        return exports.report_html(ws, done, targets, cells, leaderboard)

    right.download_button(
        "Download the HTML report",
        report,
        file_name="cnnscan-report.html",
        mime="text/html",
        on_click="ignore",
        key="report",
    )


# -- layers, filters, feature maps ----------------------------------------------------------------
def layer_table(ws: core.Workspace) -> None:
    try:
        fields = ws.receptive_fields()
    except Exception as e:  # the table still helps without them
        st.caption(f"Receptive fields unavailable for this model ({type(e).__name__}: {e}).")
        fields = {}
    st.dataframe(
        [
            {
                "layer": row.name,
                "type": row.type,
                "output": "×".join(map(str, row.output_shape)) if row.output_shape else "-",
                "parameters": row.parameters,
                "receptive field": fields[row.name].describe() if row.name in fields else "?",
                "jump": fields[row.name].describe_jump() if row.name in fields else "?",
            }
            for row in ws.layer_rows()
        ],
        hide_index=True,
        height=480,
    )


def learned(ws: core.Workspace) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Filters")
        convs = cnnscan.conv_layers(ws.model)
        if not convs:
            st.info("This model has no 2-D convolution.")
        else:
            layer = st.selectbox("Convolution", convs, key="filter_layer")
            mode = st.selectbox("Show", render.FILTER_MODES, key="filter_mode")
            count = st.slider("Filters shown (the first N)", 1, 256, 64, key="filter_count")
            try:
                weights = cnnscan.filters(ws.model, layer)
                picture = render.filter_grid(weights, mode, max_filters=count)
                st.image(
                    picture,
                    caption=f"{layer}: {tuple(weights.shape)}, min-max per filter",
                    output_format="PNG",
                    alt=f"filters of {layer}",
                )
            except (CnnscanError, ValueError) as e:
                st.error(str(e))
    with right:
        st.subheader("Feature maps")
        layers = ws.spatial_layers()
        if not layers:
            st.info("This model has no layer with spatial feature maps.")
            return
        picks = depth_layers(ws.layer_rows())
        start = layers.index(picks[len(picks) // 2]) if picks else 0
        layer = st.selectbox("Layer", layers, index=start, key="feature_layer")
        top = st.slider("Top-N channels (by mean activation)", 1, 64, 16, key="feature_top")
        scale = st.radio("Scale", render.SCALES, key="feature_scale", horizontal=True)
        try:
            maps = ws.feature_maps(layer)
            channels = cnnscan.top_channels(maps, top)
            picture = render.feature_grid(maps, channels, scale=scale)
            st.image(
                picture,
                caption=f"{layer}: {'×'.join(map(str, maps.shape))}, channels "
                + ", ".join(str(int(c)) for c in channels),
                output_format="PNG",
                alt=f"feature maps of {layer}",
            )
        except (CnnscanError, ValueError) as e:
            st.error(str(e))


# -- concepts -------------------------------------------------------------------------------------
def concepts_view(ws: core.Workspace) -> None:
    st.caption(
        "Which channels (concepts) of a layer carried a class's relevance (CRP): pick one to "
        "see the relevance flowing only through it, where it sits, and what it looks like."
    )
    layers = ws.spatial_layers()
    if not layers:
        st.info("This model has no layer with spatial feature maps.")
        return
    left, middle, right = st.columns(3)
    layer = left.selectbox(
        "Layer", layers, index=layers.index(ws.default_layer()), key="concept_layer"
    )
    classes = ws.prediction_rows(ws.top_classes(5))
    row = middle.selectbox(
        "Class", classes, format_func=lambda r: f"{r['class_id']} {r['label']}", key="concept_class"
    )
    top = right.slider("Concepts", 1, 12, 6, key="concept_top")
    pictures = st.checkbox(
        "Synthesized pictures (cached on disk; the first time takes a while)", key="concept_pics"
    )
    if not (
        st.button("Find the concepts", key="concept_go") or st.session_state.get("concepts_on")
    ):
        return
    st.session_state["concepts_on"] = True
    try:
        found = ws.concepts(layer, row["class_id"], top, pictures)
    except CnnscanError as e:
        st.error(str(e))
        return
    target = found[0]
    check = target.ablation
    if check is not None:
        st.markdown(
            f"Zeroing the top {len(check.channels)} concepts lowers the logit by "
            f"**{check.top:.3f}**; random channels by {check.random_mean:.3f} on average."
        )
    labels = [
        f"#{rank} · channel {c.channel} · {100 * c.share:+.1f} %"
        for rank, c in enumerate(target.concepts, 1)
    ]
    chosen = st.radio(
        "Concept",
        range(len(labels)),
        format_func=labels.__getitem__,
        key="concept_pick",
        horizontal=True,
    )
    concept = target.concepts[chosen]
    shown = [
        (heatmap_picture(found, concept), "heatmap: relevance only through this channel"),
        (footprint_picture(found, concept), f"footprint at {layer}"),
    ]
    if concept.picture is not None:
        shown.append((concept.picture, "synthesized picture"))
    for slot, (picture, caption) in zip(st.columns(3), shown, strict=False):
        slot.image(
            picture,
            caption=caption,
            output_format="PNG",
            alt=f"{caption} of channel {concept.channel}",
        )


# -- synthesis ------------------------------------------------------------------------------------
def synthesis(ws: core.Workspace) -> None:
    kind = st.radio("Synthesize", jobs.KINDS, key="synth_kind", horizontal=True)
    layers = ws.spatial_layers()
    first, second, third = st.columns(3)
    values: dict = {"kind": kind}
    if kind == "class image":
        labels = ws.model.labels
        top1 = ws.top_classes(1)[0]
        values["class_id"] = first.selectbox(
            "Class",
            range(len(labels)),
            index=top1,
            key="synth_class",
            format_func=lambda i: f"{i}: {labels[i]}",
        )
    else:
        picks = depth_layers(ws.layer_rows())
        start = layers.index(picks[len(picks) // 2]) if picks else 0
        values["layer"] = first.selectbox("Layer", layers, index=start, key="synth_layer")
    if kind in ("channel", "neuron"):
        strongest = cnnscan.top_channels(ws.feature_maps(values["layer"]), 5).tolist()
        values["unit"] = int(
            second.number_input(
                "Channel",
                0,
                100_000,
                strongest[0],
                key="synth_unit",
                help=f"The strongest channels of {values['layer']} for this picture: "
                + ", ".join(map(str, strongest)),
            )
        )
    if kind == "deepdream":
        values["octaves"] = second.slider("Octaves", 1, 5, 3, key="synth_octaves")
    if kind in ("class image", "channel", "neuron"):
        values["size"] = third.select_slider("Size", [96, 128, 160, 224], 128, key="synth_size")
    default_steps = 10 if kind == "deepdream" else 64
    values["steps"] = first.slider("Steps", 1, 512, default_steps, key=f"synth_steps_{kind}")
    values["seed"] = int(second.number_input("Seed", 0, 2**31 - 1, 0, key="synth_seed"))
    request = jobs.SynthesisRequest(**values)
    if st.button("Run", type="primary", key="synth_run"):
        old = st.session_state.get("job")
        if old is not None:
            old.stop()
        st.session_state["job"] = jobs.Job(
            ws.model,
            ws.picture,
            request,
            ws.results,
            jobs.request_key(ws.model_key, ws.picture, request),
        )
    job = st.session_state.get("job")
    polling = job is not None and job.running

    @st.fragment(run_every=POLL_SECONDS if polling else None)
    def panel() -> None:
        job = st.session_state.get("job")
        if job is None:
            st.caption("Runs in the background: the rest of the page stays usable.")
            return
        if job.running:
            value = f", objective {job.value:.4g}" if job.value is not None else ""
            st.progress(
                job.step / job.total,
                text=f"{job.request.title}: step {job.step} of {job.total}{value}",
            )
            st.button("Stop", key="synth_stop", on_click=job.stop)
            return
        if polling:  # finished while polling: redraw the page once so the polling stops
            st.rerun()
        if job.state == "stopped":
            st.warning(f"Stopped {job.request.title} at step {job.step} of {job.total}.")
        elif job.state == "failed":
            st.error(job.error)
        else:
            result = job.result
            st.image(
                result.image,
                caption=f"{job.request.title}: objective {result.initial:.4g} → "
                f"{result.final:.4g} in {len(result.history)} steps ({result.seconds:.1f} s)",
                width=320,
                output_format="PNG",
                alt=f"synthesized: {job.request.title}",
            )
            st.line_chart({"objective": result.history}, height=180)
            st.download_button(
                "PNG",
                render.png_bytes(result.image),
                file_name=f"{job.request.kind.replace(' ', '-')}.png",
                mime="image/png",
                on_click="ignore",
                key="synth_png",
            )

    panel()


# -- evaluation -----------------------------------------------------------------------------------
def evaluation_view(ws: core.Workspace, run: tuple | None) -> None:
    from cnnscan.app import evaluation
    from cnnscan.metrics.leaderboard import advice

    if run is None:
        st.info("Compute explanations first: the grid's methods are evaluated here.")
        return
    columns, targets, cells = run
    labels = ws.model.labels
    left, middle, right = st.columns(3)
    target = left.selectbox(
        "Class", targets, key="eval_target", format_func=lambda i: f"{i}: {labels[i]}"
    )
    steps = middle.slider("Deletion/insertion steps", 10, 224, 50, key="eval_steps")
    sanity = right.checkbox(
        "Sanity check (model randomization)",
        key="eval_sanity",
        help="Re-runs each method on the model with its top block randomized: a map that "
        "hardly changes does not depend on what the model learned.",
    )
    st.caption(
        "Deletion: the class probability as the most relevant pixels are removed first (lower "
        "area is better); insertion: as they are added to a blurred picture (higher is "
        "better). Random maps give the chance level. With the sanity check, a map that fails "
        "it is ranked below every map that passes."
    )
    asked = (target, steps, sanity, tuple(columns))
    if st.button("Evaluate", type="primary", key="eval_run"):
        st.session_state["eval_asked"] = asked
    if st.session_state.get("eval_asked") != asked:
        st.info("Press Evaluate to rank the grid's methods for this class.")
        return
    bar = st.progress(0.0, text="Evaluating…")
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        bar.progress(min(1.0, done[0] / (2 * steps * (len(columns) + 2))), text="Evaluating…")

    try:
        rows = evaluation.leaderboard_rows(
            ws, columns, cells, target, steps=steps, sanity=sanity, progress=progress
        )
    except CnnscanError as e:
        bar.empty()
        st.error(str(e))
        return
    bar.empty()
    sentence = advice(rows)
    if sentence:
        st.info(sentence)
    st.dataframe(evaluation.table(rows), hide_index=True)
    with st.expander("What the columns mean"):
        st.markdown(evaluation.legend(rows))
    for kind, slot in zip(("deletion", "insertion"), st.columns(2), strict=True):
        data = evaluation.curves(rows, kind)
        if data:
            slot.markdown(f"**{kind} curves** (probability of class {target})")
            slot.line_chart(data, x="fraction", height=260)


# -- the page -------------------------------------------------------------------------------------
def main() -> None:
    st.set_page_config(page_title="cnnscan: a CT scan of your CNN", layout="wide")
    st.title("cnnscan: a CT scan of your CNN")
    st.session_state.pop("upload_error", None)
    with st.sidebar:
        model, model_key = sidebar_model()
        picture = sidebar_picture()
    if "upload_error" in st.session_state:
        st.error(f"{st.session_state['upload_error']} The sample photo is shown instead.")
    ws = workspace(model, model_key, picture)
    try:
        header(ws)
    except Exception as e:  # e.g. a model that fails on this picture: say so and stop here
        st.error(str(e) if isinstance(e, CnnscanError) else f"{type(e).__name__}: {e}")
        st.stop()
    names = ["Explanations", "Layers", "Filters & feature maps", "Synthesis", "Concepts"]
    if core.evaluation_available():
        names.append("Evaluation")
    tabs = st.tabs(names)
    with tabs[0]:
        run = explanations(ws)
    with tabs[1]:
        layer_table(ws)
    with tabs[2]:
        learned(ws)
    with tabs[3]:
        synthesis(ws)
    with tabs[4]:
        concepts_view(ws)
    if len(tabs) > 5:
        with tabs[5]:
            evaluation_view(ws, run)


main()
