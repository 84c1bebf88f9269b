// Package control owns the agent's control API: one JSON request per line
// on a unix socket that only the agent's owner may open, one JSON
// response per line back. It is the only way the CLI reaches an agent;
// the agent registers a handler per verb.
package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Request is one control call.
type Request struct {
	Verb string          `json:"verb"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Response answers a Request. TryAgain marks a busy agent: the client
// retries (3 s apart, 12 times by default, as the checkpoint service does).
type Response struct {
	OK       bool            `json:"ok"`
	Error    string          `json:"error,omitempty"`
	TryAgain bool            `json:"try_again,omitempty"`
	Result   json.RawMessage `json:"result,omitempty"`
}

// ErrTryAgain is what a handler returns when the agent is busy.
var ErrTryAgain = errors.New("control: busy, try again")

// Handler serves one verb.
type Handler func(ctx context.Context, args json.RawMessage) (any, error)

// APIServer serves the control socket.
type APIServer struct {
	log      zerolog.Logger
	handlers map[string]Handler
	ln       net.Listener
	wg       sync.WaitGroup
}

// ListenAPI creates the socket (parent folder 0700, socket 0600) and
// serves it until Close.
func ListenAPI(path string, handlers map[string]Handler, log zerolog.Logger) (*APIServer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("agent: control socket folder: %w", err)
	}
	if err := RemoveStaleSocket(path); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("agent: listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("agent: restrict %s: %w", path, err)
	}
	s := &APIServer{log: log, handlers: handlers, ln: ln}
	s.wg.Go(s.accept)
	return s, nil
}

// RemoveStaleSocket (for the NBD socket too) removes a socket left by a dead agent, and refuses to
// start beside a live one.
func RemoveStaleSocket(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("agent: another agent is serving %s", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("agent: remove stale socket %s: %w", path, err)
	}
	return nil
}

func (s *APIServer) accept() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.wg.Go(func() { s.serve(c) })
	}
}

func (s *APIServer) serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	enc := json.NewEncoder(c)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var req Request
		resp := Response{}
		if err := json.Unmarshal(line, &req); err != nil {
			resp.Error = fmt.Sprintf("bad request: %v", err)
		} else if h, ok := s.handlers[req.Verb]; !ok {
			resp.Error = fmt.Sprintf("unknown verb %q", req.Verb)
		} else {
			res, err := h(context.Background(), req.Args)
			switch {
			case errors.Is(err, ErrTryAgain):
				resp.TryAgain, resp.Error = true, err.Error()
			case err != nil:
				resp.Error = err.Error()
			default:
				resp.OK = true
				if res != nil {
					b, merr := json.Marshal(res)
					if merr != nil {
						resp.OK, resp.Error = false, merr.Error()
					} else {
						resp.Result = b
					}
				}
			}
			s.log.Debug().Str("verb", req.Verb).Bool("ok", resp.OK).Str("error", resp.Error).Msg("control call")
		}
		if err := enc.Encode(resp); err != nil {
			return
		}
	}
}

// Close stops serving.
func (s *APIServer) Close() error {
	err := s.ln.Close()
	s.wg.Wait()
	return err
}

// Client calls an agent.
type Client struct {
	Path string
	// Timeout bounds one call (at least 100 ms; default 60 s).
	Timeout time.Duration
	// Retries and RetryWait govern "try again" answers (default 12, 3 s).
	Retries   int
	RetryWait time.Duration
}

// ErrNoAgent: nothing listens on the control socket.
var ErrNoAgent = errors.New("control: no agent is running")

// Call sends verb with args and decodes the result into out (if non-nil).
func (c *Client) Call(verb string, args, out any) error {
	timeout := c.Timeout
	if timeout == 0 {
		timeout = 60 * time.Second
	}
	timeout = max(timeout, 100*time.Millisecond)
	retries, wait := c.Retries, c.RetryWait
	if retries == 0 {
		retries = 12
	}
	if wait == 0 {
		wait = 3 * time.Second
	}
	raw, err := json.Marshal(args)
	if err != nil {
		return err
	}
	line, err := json.Marshal(Request{Verb: verb, Args: raw})
	if err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		resp, err := c.once(line, timeout)
		if err != nil {
			return err
		}
		if resp.TryAgain && attempt < retries {
			time.Sleep(wait)
			continue
		}
		if !resp.OK {
			return errors.New(resp.Error)
		}
		if out != nil && resp.Result != nil {
			return json.Unmarshal(resp.Result, out)
		}
		return nil
	}
}

func (c *Client) once(line []byte, timeout time.Duration) (Response, error) {
	var resp Response
	conn, err := net.DialTimeout("unix", c.Path, timeout)
	if err != nil {
		return resp, fmt.Errorf("%w at %s (start one with `shadow agent`): %v", ErrNoAgent, c.Path, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write(append(line, '\n')); err != nil {
		return resp, fmt.Errorf("agent: send: %w", err)
	}
	b, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		return resp, fmt.Errorf("agent: no answer within %s: %w", timeout, err)
	}
	if err := json.Unmarshal(b, &resp); err != nil {
		return resp, fmt.Errorf("agent: bad answer: %w", err)
	}
	return resp, nil
}
