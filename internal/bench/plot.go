package bench

import (
	"fmt"
	"image/color"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
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

func barsPlot(path, tech string, scen []string, by map[string]map[string]*Summary) error {
	plots := make([][]*plot.Plot, (len(Metrics)+1)/2)
	labels := make([]string, len(scen))
	for i, n := range scen {
		// One word a line: long names neither overlap nor run past the plot's edge.
		labels[i] = strings.ReplaceAll(shortName(n, tech), "-", "\n")
	}
	for i, m := range Metrics {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("%s: %s", tech, m.Label)
		p.Y.Label.Text = m.Unit
		p.Y.Min = 0
		w := vg.Points(14)
		for k, sys := range []string{SystemGodwit, SystemQEMU} {
			vals := make(plotter.Values, len(scen))
			for j, n := range scen {
				v := get(by[n][sys], m.Key)
				if math.IsNaN(v) {
					v = 0
				}
				vals[j] = v
			}
			bc, err := plotter.NewBarChart(vals, w)
			if err != nil {
				return err
			}
			bc.Color = systemColor[sys]
			bc.LineStyle.Width = 0
			bc.Offset = vg.Length(2*k-1) * w / 2
			p.Add(bc)
			p.Legend.Add(systemLabel[sys], bc)
		}
		// Headroom above the tallest bar keeps the legend (top right) off the bars.
		top := 0.0
		for _, sys := range []string{SystemGodwit, SystemQEMU} {
			for _, n := range scen {
				if v := get(by[n][sys], m.Key); !math.IsNaN(v) {
					top = max(top, v)
				}
			}
		}
		if top > 0 {
			p.Y.Max = top * 1.35
		}
		p.Legend.Top = true
		p.NominalX(labels...)
		plots[i/2] = append(plots[i/2], p)
	}
	// plot.Align wants full rows.
	for i := range plots {
		for len(plots[i]) < 2 {
			plots[i] = append(plots[i], nil)
		}
	}
	return saveTiles(path, plots, 11*vg.Inch, vg.Length(len(plots))*4*vg.Inch)
}

func saveTiles(path string, plots [][]*plot.Plot, width, height vg.Length) error {
	var img interface {
		vg.CanvasSizer
		WriteTo(io.Writer) (int64, error)
	}
	if strings.HasSuffix(path, ".png") {
		img = vgimg.PngCanvas{Canvas: vgimg.New(width, height)}
	} else {
		img = vgsvg.New(width, height)
	}
	dc := draw.New(img)
	t := draw.Tiles{Rows: len(plots), Cols: len(plots[0]), PadX: vg.Millimeter * 6, PadY: vg.Millimeter * 6,
		PadTop: vg.Millimeter * 3, PadBottom: vg.Millimeter * 3, PadLeft: vg.Millimeter * 3, PadRight: vg.Millimeter * 3}
	canvases := plot.Align(plots, t, dc)
	for i := range plots {
		for j := range plots[i] {
			if plots[i][j] != nil {
				plots[i][j].Draw(canvases[i][j])
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
// issued, in seconds at its rate in the second before: a guest the migration does not disturb
// follows the diagonal, a stalled one runs flat. Samples later than until (ms) are left out.
func progressSeconds(tl []Sample, until float64) plotter.XYs {
	u0, uBefore, tBefore := int64(-1), int64(-1), 0.0
	for _, s := range tl {
		if s.Units < 0 {
			continue
		}
		if s.TMS <= 0 {
			u0 = s.Units
		}
		if uBefore < 0 && s.TMS >= -1000 {
			uBefore, tBefore = s.Units, s.TMS
		}
	}
	if u0 < 0 || uBefore < 0 || u0 <= uBefore || tBefore >= 0 {
		return nil
	}
	perMS := float64(u0-uBefore) / -tBefore
	var xys plotter.XYs
	for _, s := range tl {
		if s.Units < 0 || s.TMS > until {
			continue
		}
		xys = append(xys, plotter.XY{X: s.TMS / 1000, Y: float64(s.Units-u0) / perMS / 1000})
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
	progP.Title.Text = "guest work since the migration was issued, in seconds at its rate before"
	progP.X.Label.Text, progP.Y.Label.Text = "seconds since the migration was issued", "seconds of work"
	any := false
	end := 0.0
	for _, sys := range []string{SystemGodwit, SystemQEMU} {
		r := timelineRun(runs, scenario, sys)
		if r == nil {
			continue
		}
		any = true
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
			bytesP.Legend.Add(systemLabel[sys], l)
		}
		if px := progressSeconds(r.Timeline, until); len(px) > 0 {
			l, err := plotter.NewLine(px)
			if err != nil {
				return false, err
			}
			l.Color, l.Width = systemColor[sys], vg.Points(1.5)
			progP.Add(l)
			progP.Legend.Add(systemLabel[sys], l)
		}
	}
	if !any {
		return false, nil
	}
	diag, err := plotter.NewLine(plotter.XYs{{X: -1, Y: -1}, {X: end / 1000, Y: end / 1000}})
	if err != nil {
		return false, err
	}
	diag.Color, diag.Dashes = color.Gray{Y: 0x99}, []vg.Length{vg.Points(4), vg.Points(3)}
	progP.Add(diag)
	progP.Legend.Add("undisturbed", diag)
	bytesP.Legend.Top, bytesP.Legend.Left = true, true
	progP.Legend.Top, progP.Legend.Left = true, true
	return true, saveTiles(path, [][]*plot.Plot{{bytesP}, {progP}}, 8*vg.Inch, 7*vg.Inch)
}

func faultCDF(path string, runs []Run) (bool, error) {
	p := plot.New()
	p.Title.Text = "post-copy fault service latency (godwit; QEMU 7.2 does not report it)"
	p.X.Label.Text, p.Y.Label.Text = "microseconds (log scale)", "fraction of faults"
	p.X.Scale, p.X.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
	p.Y.Min, p.Y.Max = 0, 1
	seen := map[string]bool{}
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
		p.Legend.Add(fmt.Sprintf("%s (%s, %d faults)", r.Scenario, systemLabel[r.System], r.Faults), l)
		n++
	}
	if n == 0 {
		return false, nil
	}
	p.Legend.Top, p.Legend.Left = true, true
	return true, p.Save(8*vg.Inch, 5*vg.Inch, path)
}

func palette(i int) color.Color {
	cs := []color.RGBA{{0x1f, 0x77, 0xb4, 0xff}, {0x2c, 0xa0, 0x2c, 0xff}, {0xd6, 0x27, 0x28, 0xff}, {0x94, 0x67, 0xbd, 0xff}, {0x8c, 0x56, 0x4b, 0xff}}
	return cs[i%len(cs)]
}
