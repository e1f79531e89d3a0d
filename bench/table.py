"""The table every Pimesh benchmark prints its figures in (see README.md); table.rs prints
the same for the Rust benchmarks.

    == bench-NAME ==
    # what was measured and how (setup lines)
    | what                    | figure | unit |
    |-------------------------|-------:|------|
    | kill -9 → ready, p50    |    731 | ms   |
    # notes on the run

One figure per row, the number alone in `figure`, its unit in `unit`; everything that is
not a figure is a `# ` line.
"""


class Table:
    def __init__(self, name):
        self.name = name
        self.setup_lines = []
        self.rows = []
        self.notes = []

    def setup(self, line):
        """A line on how the figures were taken, printed above them."""
        self.setup_lines.append(line)

    def row(self, what, figure, unit, spec=None):
        """One figure; `spec` formats a number (e.g. ".1f")."""
        text = figure if spec is None or isinstance(figure, str) else format(figure, spec)
        self.rows.append((what, str(text), unit))

    def note(self, line):
        """A line on the run, printed below the figures."""
        self.notes.append(line)

    def render(self):
        header = ("what", "figure", "unit")
        widths = [max(len(row[i]) for row in [header, *self.rows]) for i in range(3)]
        lines = [f"== bench-{self.name} =="]
        lines += [f"# {line}" for line in self.setup_lines]

        def line(row):
            return f"| {row[0]:<{widths[0]}} | {row[1]:>{widths[1]}} | {row[2]:<{widths[2]}} |"

        lines.append(line(header))
        lines.append(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 1)}:|{'-' * (widths[2] + 2)}|")
        lines += [line(row) for row in self.rows]
        lines += [f"# {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def print(self):
        print(self.render(), end="", flush=True)

