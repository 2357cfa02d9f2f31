// S-CFG: hover texts for the accordion's controls. The labels are plain words; the paper's notation
// (Shen et al., CVPR 2024) and the details live here and in the README's "Using S-CFG".
(function () {
    const titles = {
        strength: "How far each region's CFG moves from your CFG scale: 0 = plain CFG, 1 = the paper, above 1 exaggerates. r ← 1 + s·(r − 1)",
        min_rate: "Lowest CFG a region gets, as a multiple of your CFG scale (the authors' clamp, 0.8)",
        max_rate: "Highest CFG a region gets, as a multiple of your CFG scale (the authors' clamp, 3)",
        start: "S-CFG acts from this fraction of the sampling steps on (0 = the first step)",
        end: "S-CFG acts up to this fraction of the sampling steps (1 = the last step)",
        show_maps: "Add a panel after each image: the prompt words' regions, the foreground and the rate map of a few steps",
        overlay: "Add a copy of each image with the region of each prompt word drawn over it (the last step's regions)",
        preset: "official: the authors' code ((S + 3S²)/4, 3×3 smoothing); paper: eq. 9, 10 and 14 as printed",
        refine_power: "R of eq. 10: how many powers of the self-attention map refine the cross-attention (paper preset)",
        region: "Benchmark region of eq. 13: the foreground (eq. 14) or the whole image (S-CFG-mean)",
        max_scale: "Cap on any region's effective CFG scale γ·r (the authors use 15)",
        levels: "UNet attention levels read, as downsample factors of the latent; auto = latent/4 and /8 where the model has them (the authors' 16×16 and 8×8 at 512 px)",
        hires: "Hires fix pass: the same values, S-CFG off, or its own values",
        hires_strength: "Strength in the hires fix pass",
        hires_min_rate: "Min rate in the hires fix pass",
        hires_max_rate: "Max rate in the hires fix pass",
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
