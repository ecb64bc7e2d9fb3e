# Post-processing: NMS or box voting into final boxes, fusion of several detectors (fuse), then WiderFace AP.
# Code: stages/nms.py (library: pipeline/postprocess.py, pipeline/boxes.py), stages/fuse.py (pipeline/fusion.py),
# stages/evaluate.py (pipeline/metrics.py). Writes: processed/final/, processed/metrics/, processed/benchmarks/nms/.


rule nms:
    input:
        nms_input,
    output:
        T("final", "{dataset}", "{detector}", "{scales}", "{method}"),
    log:
        "logs/nms/{dataset}/{detector}/{scales}/{method}.log",
    benchmark:
        T("nms_benchmark", "{dataset}", "{detector}", "{scales}", "{method}")
    wildcard_constraints:
        method=NMS_METHODS,
    conda:
        SOFTWARE
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        method=method_args,
        args=NMS_ARGS,
        dask=DASK,
        code=code_hash("stages.nms"),
    shell:
        confrank(
            "nms",
            "nms --dataset {wildcards.dataset} --detector {wildcards.detector} --scales {wildcards.scales}"
            " {params.method} {params.args} {params.dask}",
        )


rule fuse:
    input:
        fuse_input,
    output:
        T("final", "{dataset}", "{fusion}", "{scales}", "{method}"),
    log:
        "logs/fuse/{dataset}/{fusion}/{scales}/{method}.log",
    benchmark:
        T("nms_benchmark", "{dataset}", "{fusion}", "{scales}", "{method}")
    wildcard_constraints:
        fusion=FUSION_NAMES,
        method=FUSE_METHODS,
    conda:
        SOFTWARE
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        args=fuse_args,
        dask=DASK,
        code=code_hash("stages.fuse"),
    shell:
        confrank(
            "fuse",
            "fuse --dataset {wildcards.dataset} --name {wildcards.fusion} --scales {wildcards.scales}"
            " --method {wildcards.method} {params.args} {params.dask}",
        )


rule evaluate:
    input:
        final=T("final", "{dataset}", "{detector}", "{scales}", "{method}"),
        gt=T("gt", "{dataset}"),
        images=T("images", "{dataset}"),
    output:
        metrics=T("metrics", "{dataset}", "{detector}", "{scales}", "{method}"),
        pr=T("pr_curves", "{dataset}", "{detector}", "{scales}", "{method}"),
        plot=report(
            T("pr_plot", "{dataset}", "{detector}", "{scales}", "{method}"),
            category="PR curves",
            subcategory="{dataset}",
            labels={"detector": "{detector}", "scales": "{scales}", "method": "{method}"},
        ),
    log:
        "logs/evaluate/{dataset}/{detector}/{scales}/{method}.log",
    wildcard_constraints:
        detector=FINAL_DETECTORS,
        method=FINAL_METHODS,
    conda:
        SOFTWARE
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        method=method_args,
        code=code_hash("stages.evaluate"),
    shell:
        confrank(
            "evaluate",
            "evaluate --dataset {wildcards.dataset} --detector {wildcards.detector} --scales {wildcards.scales}"
            " {params.method} --format json --plot",
        )
