# Detection: one job per shard of a dataset's images, then the oracle IoU of every box.
# Code: stages/detect.py (library: pipeline/detect.py, pipeline/detectors/), stages/oracle.py
# (pipeline/boxes.py). Writes: interim/detections/, interim/latency/, interim/oracle/.


rule detect:
    input:
        images=T("images", "{dataset}"),
    output:
        detections=T("detections", "{dataset}", "{detector}", "{scales}", "{shard}"),
        latency=T("latency", "{dataset}", "{detector}", "{scales}", "{shard}"),
    log:
        "logs/detect/{dataset}/{detector}/{scales}/part-{shard}.log",
    conda:
        SOFTWARE
    threads: 2
    resources:
        gpu=1,
        # an 8K frame's activations take GBs on a CPU: with --resources mem_mb=... (the demo
        # sets it) snakemake runs no more 8K shards at once than memory allows
        mem_mb=lambda wc: (12000 if (SCALE_SETS[wc.scales].long_edge or 0) >= EIGHT_K else 4000),
        runtime=120,
    params:
        shards=lambda wc: DATASETS[wc.dataset]["shards"],
        batch=lambda wc: flag("batch-size", config["detect"]["batch_size"].get(wc.scales)),
        weights=config["weights_dir"],
        code=code_hash("stages.detect"),
    shell:
        confrank(
            "detect",
            "detect --dataset {wildcards.dataset} --detector {wildcards.detector} --scales {wildcards.scales}"
            " --shard {wildcards.shard}/{params.shards} {params.batch}",
            env=WEIGHTS_ENV,
            device=True,
        )


rule oracle:
    input:
        detections=lambda wc: detection_shards(wc.dataset, wc.detector, wc.scales),
        gt=T("gt", "{dataset}"),
    output:
        directory(T("oracle_dir", "{dataset}", "{detector}", "{scales}")),
    log:
        "logs/oracle/{dataset}/{detector}/{scales}.log",
    conda:
        SOFTWARE
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        dask=DASK,
        code=code_hash("stages.oracle"),
    shell:
        confrank(
            "oracle",
            "oracle --dataset {wildcards.dataset} --detector {wildcards.detector} --scales {wildcards.scales} {params.dask}",
        )
