# The confidence ranker: per-box features, training, re-scoring, cross-validation.
# Code: stages/features.py, stages/train.py, stages/rerank.py, stages/cv.py (shared:
# stages/rankers.py, stages/featurestore.py; library: pipeline/ranker/). Writes:
# interim/features/, processed/rankers/{ranker}/, interim/reranked/, processed/cv/.


rule features:
    input:
        own=T("oracle_dir", "{dataset}", "{detector}", "{scales}"),
        evidence=lambda wc: evidence_dirs(wc.dataset, wc.detector, wc.scales),
        images=T("images", "{dataset}"),
    output:
        directory(T("features_dir", "{dataset}", "{detector}", "{scales}")),
    log:
        "logs/features/{dataset}/{detector}/{scales}.log",
    conda:
        SOFTWARE
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        evidence=EVIDENCE,
        code=code_hash("stages.features"),
    shell:
        confrank(
            "features",
            "features --dataset {wildcards.dataset} --detector {wildcards.detector} --scales {wildcards.scales}"
            " --evidence {params.evidence}",
        )


rule train:
    input:
        train_input,
    output:
        model=T("ranker_model", "{ranker}"),
        log=T("train_log", "{ranker}"),
    log:
        "logs/train/{ranker}.log",
    conda:
        SOFTWARE
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    params:
        args=train_args,
        settings=lambda wc: json.dumps(resolve_ranker(RANKERS[wc.ranker]), sort_keys=True),
        code=code_hash("stages.train"),
    shell:
        confrank("train", "train --ranker {wildcards.ranker} {params.args}", device=True)


rule rerank:
    input:
        model=T("ranker_model", "{ranker}"),
        oracle=T("oracle_dir", "{dataset}", "{detector}", "{scales}"),
        features=rerank_features,
        detections=lambda wc: detection_shards(wc.dataset, wc.detector, wc.scales),
    output:
        directory(T("reranked_dir", "{ranker}", "{dataset}", "{detector}", "{scales}")),
    log:
        "logs/rerank/{ranker}/{dataset}/{detector}/{scales}.log",
    benchmark:
        T("rerank_benchmark", "{ranker}", "{dataset}", "{detector}", "{scales}")
    conda:
        SOFTWARE
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=60,
    params:
        code=code_hash("stages.rerank"),
    shell:
        confrank(
            "rerank",
            "rerank --dataset {wildcards.dataset} --detector {wildcards.detector} --scales {wildcards.scales}"
            " --ranker {wildcards.ranker}",
            device=True,
        )


rule cv:
    input:
        cv_input,
    output:
        T("cv_deltas", "{cv}", "{variant}"),
    log:
        "logs/cv/{cv}/{variant}.log",
    conda:
        SOFTWARE
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=1440,
    params:
        args=cv_args,
        settings=lambda wc: json.dumps(resolve_ranker(CV[wc.cv]["variants"][wc.variant]), sort_keys=True),
        code=code_hash("stages.cv"),
    shell:
        confrank("cv", "cv run --name {wildcards.cv} --variant {wildcards.variant} {params.args}", device=True)


rule cv_summary:
    input:
        lambda wc: [T("cv_deltas", wc.cv, v) for v in CV[wc.cv]["variants"]],
    output:
        deltas=T("cv_deltas", "{cv}"),
        summary=T("cv_summary", "{cv}"),
    log:
        "logs/cv/{cv}.log",
    conda:
        SOFTWARE
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        variants=lambda wc: ",".join(CV[wc.cv]["variants"]),
        code=code_hash("stages.cv"),
    shell:
        confrank("cv_summary", "cv summary --name {wildcards.cv} --variants {params.variants}")
