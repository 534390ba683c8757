rule report:
    """LaTeX tables (Jinja2), matplotlib figures and a main.tex that includes them."""
    input:
        all_eval_paths(),
    output:
        report_outputs(),
    params:
        out_dir=f"{RESULTS}/paper",
        title=config["report"]["title"],
        order=method_order(),
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "hetmerge report --results {input:q} --out-dir {params.out_dir:q} --title {params.title:q} "
        "--method-order {params.order:q} > {log:q} 2>&1"


rule paper_pdf:
    """Optional: compile results/paper/main.tex (needs a LaTeX installation)."""
    input:
        report_outputs(),
    output:
        f"{RESULTS}/paper/main.pdf",
    log:
        f"{RESULTS}/logs/paper_pdf.log",
    shell:
        "cd {RESULTS}/paper && latexmk -pdf -interaction=nonstopmode -halt-on-error main.tex > ../../{log:q} 2>&1"
