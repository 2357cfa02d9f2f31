// S-CFG: hover titles on the accordion's controls, for WebUIs whose gradio hides `info` texts.
(function () {
    const titles = {
        strength: "0 = plain CFG, 1 = the paper's per-region scales, above 1 exaggerates the differences",
        preset: "official: the authors' code; paper: eq. 9, 10 and 14 as printed",
        levels: "auto, or attention downsample factors such as 4,8",
    };
    function addTitles() {
        for (const tab of ["txt2img", "img2img"]) {
            for (const [name, text] of Object.entries(titles)) {
                const el = gradioApp().getElementById(`scfg_${name}_${tab}`);
                if (el && !el.title) el.title = text;
            }
        }
    }
    onUiLoaded(addTitles);
})();
