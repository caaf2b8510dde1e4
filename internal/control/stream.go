package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
)

// StreamHandler serves a long request: it may emit any number of progress values, each sent at
// once as one JSON line, and returns the final value (or error), sent as the last line. The
// request's context ends when the client goes away, which is how a client cancels.
type StreamHandler func(ctx context.Context, body []byte, emit func(any)) (any, error)

// StreamLine is one line of a streamed answer: progress, or the final result or error.
type StreamLine struct {
	Progress json.RawMessage `json:"progress,omitempty"`
	Result   json.RawMessage `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
}

// HandleStream registers a streaming handler.
func (s *Server) HandleStream(method, path string, h StreamHandler) {
	s.streams[method+" "+path] = h
}

func (s *Server) serveStream(w http.ResponseWriter, r *http.Request, h StreamHandler, body []byte) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	var mu sync.Mutex
	write := func(l StreamLine) {
		mu.Lock()
		defer mu.Unlock()
		b, _ := json.Marshal(l)
		w.Write(append(b, '\n'))
		if flusher != nil {
			flusher.Flush()
		}
	}
	emit := func(v any) {
		b, err := json.Marshal(v)
		if err == nil {
			write(StreamLine{Progress: b})
		}
	}
	out, err := h(r.Context(), body, emit)
	line := StreamLine{}
	if out != nil {
		line.Result, _ = json.Marshal(out)
	}
	if err != nil {
		line.Error = err.Error()
	}
	write(line)
}

// Stream sends a request to a streaming endpoint, calls progress for every progress line, and
// decodes the final result into out. A final error line is returned as an error, after out has
// been filled with whatever result came with it. Cancelling ctx cancels the request.
func (c *Client) Stream(ctx context.Context, method, path string, in any, progress func(json.RawMessage), out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("control: encode %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.url(path), body)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.dialErr(method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return answerErr(method, path, resp.StatusCode, data)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var l StreamLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("control: %s %s: bad stream line %q: %w", method, path, sc.Bytes(), err)
		}
		if l.Progress != nil {
			if progress != nil {
				progress(l.Progress)
			}
			continue
		}
		if l.Result != nil && out != nil {
			if err := json.Unmarshal(l.Result, out); err != nil {
				return fmt.Errorf("control: %s %s: decoding result: %w", method, path, err)
			}
		}
		if l.Error != "" {
			return errors.New(l.Error)
		}
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("control: %s %s: stream broken: %w", method, path, err)
	}
	return fmt.Errorf("control: %s %s: the VM process closed the stream without a result", method, path)
}
