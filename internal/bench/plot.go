package bench

import (
	"fmt"
	"image/color"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

var systemColor = map[string]color.Color{
	SystemGodwit: color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
	SystemQEMU:   color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff},
}

var systemLabel = map[string]string{SystemGodwit: "godwit", SystemQEMU: "QEMU"}

func barsFile(technique string) string { return "bars-" + technique + ".svg" }
func timelineFile(scenario string) string {
	return "timeline-" + scenario + ".svg"
}

// FaultCDFFile is the post-copy fault-latency CDF.
const FaultCDFFile = "fault-latency-cdf.svg"

// WritePlots writes the plots for runs into dir and returns their file names: per technique,
// bars of the median total time, downtime, blackout and bytes of both systems for each
// scenario; per scenario, a timeline of bytes sent and guest progress through its first
// successful migration on each system; and, when post-copy runs recorded fault latencies,
// their CDF.
func WritePlots(dir string, runs []Run) ([]string, error) {
	var files []string
	names, by := Summarize(runs)
	setup := setups(runs)
	for _, tech := range []string{Precopy, Postcopy, Hybrid} {
		var scen []string
		for _, n := range names {
			if setup[n].Technique == tech {
				scen = append(scen, n)
			}
		}
		if len(scen) == 0 {
			continue
		}
		if err := barsPlot(filepath.Join(dir, barsFile(tech)), tech, scen, by); err != nil {
			return files, err
		}
		files = append(files, barsFile(tech))
	}
	for _, n := range names {
		ok, err := timelinePlot(filepath.Join(dir, timelineFile(n)), n, runs)
		if err != nil {
			return files, err
		}
		if ok {
			files = append(files, timelineFile(n))
		}
	}
	ok, err := faultCDF(filepath.Join(dir, FaultCDFFile), runs)
	if err != nil {
		return files, err
	}
	if ok {
		files = append(files, FaultCDFFile)
	}
	return files, nil
}

// shortName drops the technique from a scenario name for axis labels.
func shortName(n, tech string) string {
	s := strings.ReplaceAll(n, "-"+tech, "")
	if s == "" {
		return n
	}
	return s
}

// Bar plots: two bars (godwit, QEMU) per scenario, barWidth each; a scenario's slot is at
// least slotMin wide, and wider when its label's longest word needs it.
const (
	barWidth vg.Length = 12 // points
	slotMin            = 3 * barWidth
	barCols            = 2
)

func barsPlot(path, tech string, scen []string, by map[string]map[string]*Summary) error {
	labels := make([]string, len(scen))
	for i, n := range scen {
		// One word a line: long names neither overlap nor run past the plot's edge.
		labels[i] = strings.ReplaceAll(shortName(n, tech), "-", "\n")
	}
	var legend []legendItem
	var cells []*plot.Plot
	slot := slotMin
	for i, m := range Metrics {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("%s: %s", tech, m.Label)
		p.Y.Label.Text = m.Unit
		p.Y.Min = 0
		for k, sys := range []string{SystemGodwit, SystemQEMU} {
			vals := make(plotter.Values, len(scen))
			for j, n := range scen {
				v := get(by[n][sys], m.Key)
				if math.IsNaN(v) {
					v = 0
				}
				vals[j] = v
			}
			bc, err := plotter.NewBarChart(vals, barWidth)
			if err != nil {
				return err
			}
			bc.Color = systemColor[sys]
			bc.LineStyle.Width = 0
			bc.Offset = vg.Length(2*k-1) * barWidth / 2
			p.Add(bc)
			if i == 0 {
				legend = append(legend, legendItem{systemLabel[sys], bc})
			}
		}
		// A little room above the tallest bar, under the title.
		top := 0.0
		for _, n := range scen {
			for _, sys := range []string{SystemGodwit, SystemQEMU} {
				if v := get(by[n][sys], m.Key); !math.IsNaN(v) {
					top = max(top, v)
				}
			}
		}
		if top > 0 {
			p.Y.Max = top * 1.06
		}
		p.NominalX(labels...)
		// Each scenario in the middle of a slot of its own: no label reaches past the
		// plot's sides, and the first needs no room from the Y axis.
		p.X.Min, p.X.Max, p.Y.Padding = -0.5, float64(len(scen))-0.5, 0
		p.Y.Tick.Marker = plainTicks
		for _, l := range labels {
			for _, w := range strings.Split(l, "\n") {
				slot = max(slot, textWidth(p.X.Tick.Label, w)+3*vg.Millimeter)
			}
		}
		cells = append(cells, p)
	}
	// Rows of barCols plots; plot.Align wants full rows, so the last is padded with nil.
	var grid [][]*plot.Plot
	for i := 0; i < len(cells); i += barCols {
		row := make([]*plot.Plot, barCols)
		copy(row, cells[i:min(i+barCols, len(cells))])
		grid = append(grid, row)
	}
	// Wide enough for every slot next to the Y axis (its ticks and unit).
	width := max(8*vg.Inch, barCols*(vg.Length(len(scen))*slot+25*vg.Millimeter))
	return saveFigure(path, grid, legend, width, vg.Length(len(grid))*3*vg.Inch)
}

// plainTicks are gonum's default ticks labelled without trailing zeros ("250", not "250.00").
var plainTicks = plot.TickerFunc(func(min, max float64) []plot.Tick {
	ts := plot.DefaultTicks{}.Ticks(min, max)
	for i := range ts {
		if ts[i].Label != "" {
			ts[i].Label = strconv.FormatFloat(ts[i].Value, 'f', -1, 64)
		}
	}
	return ts
})

// textWidth is how wide s is in sty, with room to spare: the SVGs name the Liberation fonts,
// and a viewer without them substitutes its own, DejaVu's being about a fifth wider.
func textWidth(sty text.Style, s string) vg.Length { return sty.Width(s) * 1.25 }

// legendItem is an entry of a figure's legend.
type legendItem struct {
	label string
	thumb plot.Thumbnailer
}

// saveFigure draws the plots of grid tiled under a legend of the figure's own (a strip above
// them, outside every plot area, so that it covers no data) and writes path: SVG, or PNG if
// path ends in .png. width and height are the plots' area; the legend adds to the height.
func saveFigure(path string, grid [][]*plot.Plot, legend []legendItem, width, height vg.Length) error {
	sty := plot.NewLegend().TextStyle
	rows := legendRows(legend, sty, width-10*vg.Millimeter)
	lineH := sty.Height("Mg") * 1.4
	strip := vg.Length(len(rows))*lineH + 3*vg.Millimeter
	if len(rows) == 0 {
		strip = 0
	}
	var img interface {
		vg.CanvasSizer
		WriteTo(io.Writer) (int64, error)
	}
	if strings.HasSuffix(path, ".png") {
		img = vgimg.PngCanvas{Canvas: vgimg.New(width, height+strip)}
	} else {
		img = vgsvg.New(width, height+strip)
	}
	dc := draw.New(img)
	y := dc.Max.Y - 2*vg.Millimeter
	for _, row := range rows {
		y -= lineH
		drawLegendRow(dc, row, sty, y, lineH)
	}
	plots := draw.Crop(dc, 0, 0, 0, -strip)
	t := draw.Tiles{Rows: len(grid), Cols: len(grid[0]), PadX: vg.Millimeter * 8, PadY: vg.Millimeter * 6,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 3, PadLeft: vg.Millimeter * 3, PadRight: vg.Millimeter * 5}
	canvases := plot.Align(grid, t, plots)
	for i := range grid {
		for j := range grid[i] {
			if grid[i][j] != nil {
				grid[i][j].Draw(canvases[i][j])
			}
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := img.WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Legend geometry: a thumbnail, a gap, the label, then a wider gap before the next entry.
const (
	legendThumb = 7 * vg.Millimeter
	legendGap   = 2 * vg.Millimeter
	legendSep   = 8 * vg.Millimeter
)

func legendItemWidth(it legendItem, sty text.Style) vg.Length {
	return legendThumb + legendGap + textWidth(sty, it.label)
}

// legendRows breaks the entries into rows no wider than width.
func legendRows(items []legendItem, sty text.Style, width vg.Length) [][]legendItem {
	var rows [][]legendItem
	var w vg.Length
	for _, it := range items {
		iw := legendItemWidth(it, sty)
		if n := len(rows); n > 0 && w+legendSep+iw <= width {
			rows[n-1] = append(rows[n-1], it)
			w += legendSep + iw
			continue
		}
		rows = append(rows, []legendItem{it})
		w = iw
	}
	return rows
}

// drawLegendRow draws a row of entries centred across c, their baseline band from y to y+h.
func drawLegendRow(c draw.Canvas, row []legendItem, sty text.Style, y, h vg.Length) {
	var w vg.Length
	for i, it := range row {
		if i > 0 {
			w += legendSep
		}
		w += legendItemWidth(it, sty)
	}
	x := c.Center().X - w/2
	sty.XAlign, sty.YAlign = draw.XLeft, draw.YCenter
	mid := y + h/2
	for _, it := range row {
		thumb := draw.Canvas{Canvas: c.Canvas, Rectangle: vg.Rectangle{
			Min: vg.Point{X: x, Y: mid - h/4}, Max: vg.Point{X: x + legendThumb, Y: mid + h/4}}}
		it.thumb.Thumbnail(&thumb)
		c.FillText(sty, vg.Point{X: x + legendThumb + legendGap, Y: mid}, it.label)
		x += legendItemWidth(it, sty) + legendSep
	}
}

// timelineRun is the first successful run of the scenario on the system that has a timeline.
func timelineRun(runs []Run, scenario, sys string) *Run {
	for i := range runs {
		r := &runs[i]
		if r.Scenario == scenario && r.System == sys && r.Result == ResultOK && len(r.Timeline) > 1 {
			return r
		}
	}
	return nil
}

// progressSeconds turns cumulative work units into the guest's work since the migration was
// issued, in seconds at its rate in the second before (the rate and count WorkLost uses): a
// guest the migration does not disturb follows the diagonal, a stalled one runs flat. Samples
// later than until (ms) are left out.
func progressSeconds(tl []Sample, until float64) plotter.XYs {
	perMS := WorkRate(tl) / 1000
	pts := workCounts(tl)
	if perMS <= 0 || len(pts) < 2 || pts[0].TMS > 0 || pts[len(pts)-1].TMS < 0 {
		return nil
	}
	u0 := unitsAt(pts, 0)
	var xys plotter.XYs
	for _, s := range pts {
		if s.TMS <= until {
			xys = append(xys, plotter.XY{X: s.TMS / 1000, Y: (float64(s.Units) - u0) / perMS / 1000})
		}
	}
	return xys
}

// timelineEnd is where a run's timeline plot ends: two seconds after the migration (QEMU's
// samples go on while the destination guest verifies).
func timelineEnd(r *Run) float64 { return r.TotalMS + 2000 }

func timelinePlot(path, scenario string, runs []Run) (bool, error) {
	bytesP, progP := plot.New(), plot.New()
	bytesP.Title.Text = scenario + ": bytes sent (source's end of the link)"
	bytesP.X.Label.Text, bytesP.Y.Label.Text = "seconds since the migration was issued", "MiB"
	progP.Title.Text = "guest work done since the migration was issued"
	progP.X.Label.Text, progP.Y.Label.Text = "seconds since the migration was issued", "seconds of work"
	for _, p := range []*plot.Plot{bytesP, progP} {
		p.X.Tick.Marker, p.Y.Tick.Marker = plainTicks, plainTicks
	}
	var legend []legendItem
	var lost []string
	any := false
	end := 0.0
	for _, sys := range []string{SystemGodwit, SystemQEMU} {
		r := timelineRun(runs, scenario, sys)
		if r == nil {
			continue
		}
		any = true
		if v := WorkLostMS(*r); !math.IsNaN(v) {
			lost = append(lost, fmt.Sprintf("%s %.0f ms", systemLabel[sys], v))
		}
		until := timelineEnd(r)
		end = max(end, until)
		var bx plotter.XYs
		for _, s := range r.Timeline {
			if s.LinkBytes >= 0 && s.TMS <= until {
				bx = append(bx, plotter.XY{X: s.TMS / 1000, Y: float64(s.LinkBytes) / (1 << 20)})
			}
		}
		if len(bx) > 0 {
			l, err := plotter.NewLine(bx)
			if err != nil {
				return false, err
			}
			l.Color, l.Width = systemColor[sys], vg.Points(1.5)
			bytesP.Add(l)
			legend = append(legend, legendItem{systemLabel[sys], l})
		}
		if px := progressSeconds(r.Timeline, until); len(px) > 0 {
			l, err := plotter.NewLine(px)
			if err != nil {
				return false, err
			}
			l.Color, l.Width = systemColor[sys], vg.Points(1.5)
			progP.Add(l)
			if len(bx) == 0 {
				legend = append(legend, legendItem{systemLabel[sys], l})
			}
		}
	}
	if !any {
		return false, nil
	}
	if len(lost) > 0 {
		progP.Title.Text += " (work lost: " + strings.Join(lost, ", ") + ")"
	}
	diag, err := plotter.NewLine(plotter.XYs{{X: -1, Y: -1}, {X: end / 1000, Y: end / 1000}})
	if err != nil {
		return false, err
	}
	diag.Color, diag.Dashes = color.Gray{Y: 0x99}, []vg.Length{vg.Points(4), vg.Points(3)}
	progP.Add(diag)
	legend = append(legend, legendItem{"guest undisturbed (lower plot)", diag})
	return true, saveFigure(path, [][]*plot.Plot{{bytesP}, {progP}}, legend, 8*vg.Inch, 7*vg.Inch)
}

func faultCDF(path string, runs []Run) (bool, error) {
	p := plot.New()
	p.Title.Text = "post-copy fault service latency (godwit; QEMU 7.2 does not report it)"
	p.X.Label.Text, p.Y.Label.Text = "microseconds (log scale)", "fraction of faults"
	p.X.Scale, p.X.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
	p.Y.Min, p.Y.Max = 0, 1
	p.Y.Tick.Marker = plainTicks
	seen := map[string]bool{}
	var legend []legendItem
	n := 0
	for _, r := range runs {
		if r.Result != ResultOK || len(r.FaultLatencyUS) == 0 {
			continue
		}
		key := r.Scenario + " " + r.System
		if seen[key] {
			continue
		}
		seen[key] = true
		var v []float64
		for _, x := range r.FaultLatencyUS {
			if x > 0 {
				v = append(v, x)
			}
		}
		if len(v) == 0 {
			continue
		}
		slices.Sort(v)
		xys := make(plotter.XYs, len(v))
		for i, x := range v {
			xys[i].X, xys[i].Y = x, float64(i+1)/float64(len(v))
		}
		l, err := plotter.NewLine(xys)
		if err != nil {
			return false, err
		}
		l.Color, l.Width = palette(n), vg.Points(1.5)
		p.Add(l)
		legend = append(legend, legendItem{fmt.Sprintf("%s (%s, %d faults)", r.Scenario, systemLabel[r.System], r.Faults), l})
		n++
	}
	if n == 0 {
		return false, nil
	}
	return true, saveFigure(path, [][]*plot.Plot{{p}}, legend, 8*vg.Inch, 5*vg.Inch)
}

func palette(i int) color.Color {
	cs := []color.RGBA{{0x1f, 0x77, 0xb4, 0xff}, {0x2c, 0xa0, 0x2c, 0xff}, {0xd6, 0x27, 0x28, 0xff}, {0x94, 0x67, 0xbd, 0xff}, {0x8c, 0x56, 0x4b, 0xff}}
	return cs[i%len(cs)]
}
