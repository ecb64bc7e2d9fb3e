# Post-processing: NMS or box voting into final boxes, then WiderFace AP.
# Code: stages/nms.py (library: pipeline/postprocess.py, pipeline/boxes.py), stages/evaluate.py
# (pipeline/metrics.py). Writes: processed/final/, processed/metrics/, processed/benchmarks/nms/.


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
        method=NMS_METHODS,
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
