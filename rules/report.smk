# The report: paper-style tables and figures from every result.
# Code: stages/report.py (library: pipeline/report.py). Writes: processed/report/.


rule report:
    input:
        metrics=metrics_files(RESULTS),
        rankers=[T("train_log", r) for r in used_rankers(config)],
        cv=[T("cv_deltas", name) for name in CV],
    output:
        html=report(str(REPORT.html), category="Report"),
        md=str(REPORT.md),
        figures=report(directory(str(REPORT.figures)), patterns=["{name}.png"], category="Figures"),
    log:
        "logs/report.log",
    conda:
        SOFTWARE
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        out=lambda wc, output: shlex.quote(str(Path(output.md).parent)),
        settings=shlex.quote(json.dumps(REPORT_SETTINGS, sort_keys=True)),
        code=code_hash("stages.report"),
    shell:
        confrank("report", "report --out {params.out} --settings {params.settings}")
