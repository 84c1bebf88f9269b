// Package policy owns the HBMM and minicopy policies' language: what
// `--policy` and `set --policy hbmm=(…)` accept, its limits (from OpenVMS
// SET SHADOW /POLICY) and how a policy picks master hosts. It parses and
// decides; the agent stores policies and applies them.
package policy

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"unicode"
)

// ErrPolicy marks a policy string or a policy command the agent refuses.
var ErrPolicy = errors.New("policy: bad policy")

// Policy names with a meaning of their own (OpenVMS SET SHADOW /POLICY).
const (
	// PolicyDefault is the policy a set uses when none was given to it.
	PolicyDefault = "DEFAULT"
	// PolicyNoDefault, assigned to a set, keeps it off HBMM, DEFAULT
	// included.
	PolicyNoDefault = "NODEFAULT"
)

// Limits from OpenVMS: a policy name of 1–64 characters, up to 6 master
// bitmaps per set (V8.3), up to 128 named policies.
const (
	maxPolicyName    = 64
	maxMasters       = 6
	MaxNamedPolicies = 128
)

// MasterList is one MASTER_LIST=(…) with its COUNT.
type MasterList struct {
	// Hosts are the systems allowed to hold a master bitmap; "*" is any.
	Hosts []string `json:"hosts"`
	// Count is how many of them do (0: min(len(Hosts), 6)).
	Count int `json:"count,omitempty"`
}

// HBMMPolicy is an HBMM policy: where master bitmaps live and when they
// are reset.
type HBMMPolicy struct {
	// Name is the policy's name ("" for a set's own unnamed policy).
	Name  string       `json:"name,omitempty"`
	Lists []MasterList `json:"master_lists"`
	// ResetThreshold, in 512-byte blocks: a master bitmap recording more
	// modified blocks than this is cleared (0: never).
	ResetThreshold uint64 `json:"reset_threshold,omitempty"`
	// WritePolicy is how many masters acknowledge a bit-set before the
	// write proceeds: WriteAll (every master; "" means it too).
	WritePolicy string `json:"write_policy,omitempty"`
}

// Write policies (the seed's replica write policies): "all", every master
// acknowledges each bit-set; "active", one active master does and the
// standbys are brought up to date asynchronously (shadowset.WriteActive).
const (
	WriteAll    = "all"
	WriteActive = "active"
)

// Masters picks the hosts that hold master bitmaps among candidates (the
// hosts that have the set mounted), in list order, COUNT per list, at
// most six in all.
func (p HBMMPolicy) Masters(candidates []string) []string {
	var out []string
	for _, l := range p.Lists {
		count := l.Count
		if count <= 0 {
			count = min(len(l.Hosts), maxMasters)
			if slices.Contains(l.Hosts, "*") {
				count = maxMasters
			}
		}
		took := 0
		for _, c := range candidates {
			if took >= count || len(out) >= maxMasters {
				break
			}
			if slices.Contains(out, c) {
				continue
			}
			if slices.Contains(l.Hosts, "*") || slices.ContainsFunc(l.Hosts, func(h string) bool { return strings.EqualFold(h, c) }) {
				out = append(out, c)
				took++
			}
		}
	}
	return out
}

// String renders the policy in the syntax ParseHBMMPolicy reads.
func (p HBMMPolicy) String() string {
	var parts []string
	for _, l := range p.Lists {
		s := "master_list=(" + strings.Join(l.Hosts, ",") + ")"
		if l.Count > 0 {
			s += ",count=" + strconv.Itoa(l.Count)
		}
		parts = append(parts, s)
	}
	if p.ResetThreshold > 0 {
		parts = append(parts, "reset_threshold="+strconv.FormatUint(p.ResetThreshold, 10))
	}
	if p.WritePolicy != "" {
		parts = append(parts, "write_policy="+p.WritePolicy)
	}
	return "hbmm=(" + strings.Join(parts, ",") + ")"
}

// PolicyRef is what `--policy hbmm=…` says: a policy spelled out, or the
// name of one (NODEFAULT included).
type PolicyRef struct {
	Policy *HBMMPolicy
	Name   string
}

// punctSpace matches spaces around the policy syntax's punctuation, which
// are ignored; spaces elsewhere are an error.
var punctSpace = regexp.MustCompile(`\s*([(),=])\s*`)

// ParseHBMMPolicy reads `hbmm=(master_list=(a,b),count=2,reset_threshold=N,write_policy=all)`
// (several master_list=(…) each followed by its own count=, in any case,
// spaces around punctuation ignored) or `hbmm=NAME`.
func ParseHBMMPolicy(s string) (PolicyRef, error) {
	src := s
	s = strings.TrimSpace(punctSpace.ReplaceAllString(s, "$1"))
	if strings.ContainsFunc(s, unicode.IsSpace) {
		return PolicyRef{}, fmt.Errorf("%w: %q: a space inside a name or number", ErrPolicy, src)
	}
	rest, ok := cutPrefixFold(s, "hbmm=")
	if !ok {
		return PolicyRef{}, fmt.Errorf("%w: %q: want hbmm=(master_list=(...),count=N,reset_threshold=N) or hbmm=NAME", ErrPolicy, src)
	}
	if !strings.HasPrefix(rest, "(") {
		if err := ValidName(rest); err != nil {
			return PolicyRef{}, err
		}
		return PolicyRef{Name: strings.ToUpper(rest)}, nil
	}
	if !strings.HasSuffix(rest, ")") {
		return PolicyRef{}, fmt.Errorf("%w: %q: unbalanced parentheses", ErrPolicy, src)
	}
	body := rest[1 : len(rest)-1]
	items, err := splitTop(body)
	if err != nil {
		return PolicyRef{}, fmt.Errorf("%w: %q: %v", ErrPolicy, src, err)
	}
	p := &HBMMPolicy{}
	sawThreshold, sawWrite := false, false
	for _, it := range items {
		k, v, ok := strings.Cut(it, "=")
		if !ok || v == "" {
			return PolicyRef{}, fmt.Errorf("%w: %q: %q needs a value", ErrPolicy, src, it)
		}
		switch strings.ToLower(k) {
		case "master_list":
			hosts, err := hostList(v)
			if err != nil {
				return PolicyRef{}, fmt.Errorf("%w: %q: %v", ErrPolicy, src, err)
			}
			p.Lists = append(p.Lists, MasterList{Hosts: hosts})
		case "count":
			if len(p.Lists) == 0 {
				return PolicyRef{}, fmt.Errorf("%w: %q: count= must follow its master_list=", ErrPolicy, src)
			}
			l := &p.Lists[len(p.Lists)-1]
			if l.Count != 0 {
				return PolicyRef{}, fmt.Errorf("%w: %q: one count= per master_list", ErrPolicy, src)
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > maxMasters {
				return PolicyRef{}, fmt.Errorf("%w: %q: count=%s: want 1 to %d", ErrPolicy, src, v, maxMasters)
			}
			l.Count = n
		case "reset_threshold":
			if sawThreshold {
				return PolicyRef{}, fmt.Errorf("%w: %q: reset_threshold given twice", ErrPolicy, src)
			}
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return PolicyRef{}, fmt.Errorf("%w: %q: reset_threshold=%s: want a block count", ErrPolicy, src, v)
			}
			p.ResetThreshold, sawThreshold = n, true
		case "write_policy":
			if sawWrite {
				return PolicyRef{}, fmt.Errorf("%w: %q: write_policy given twice", ErrPolicy, src)
			}
			switch strings.ToLower(v) {
			case WriteAll:
				p.WritePolicy, sawWrite = WriteAll, true
			case WriteActive:
				p.WritePolicy, sawWrite = WriteActive, true
			default:
				return PolicyRef{}, fmt.Errorf("%w: %q: write_policy=%s: want all or active", ErrPolicy, src, v)
			}
		default:
			return PolicyRef{}, fmt.Errorf("%w: %q: unknown keyword %q (want master_list, count, reset_threshold, write_policy)", ErrPolicy, src, k)
		}
	}
	if len(p.Lists) == 0 {
		return PolicyRef{}, fmt.Errorf("%w: %q: master_list=(...) is required", ErrPolicy, src)
	}
	return PolicyRef{Policy: p}, nil
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// splitTop splits on commas outside parentheses.
func splitTop(s string) ([]string, error) {
	var out []string
	depth, start := 0, 0
	for i, r := range s {
		switch r {
		case '(':
			depth++
			if depth > 1 {
				return nil, errors.New("nested parentheses")
			}
		case ')':
			depth--
			if depth < 0 {
				return nil, errors.New("unbalanced parentheses")
			}
		case ',':
			if depth == 0 {
				out = append(out, s[start:i])
				start = i + 1
			}
		}
	}
	if depth != 0 {
		return nil, errors.New("unbalanced parentheses")
	}
	return append(out, s[start:]), nil
}

// hostList reads "(a,b)", "a" or "*".
func hostList(v string) ([]string, error) {
	if strings.HasPrefix(v, "(") {
		if !strings.HasSuffix(v, ")") {
			return nil, errors.New("master_list: unbalanced parentheses")
		}
		v = v[1 : len(v)-1]
	}
	var hosts []string
	for h := range strings.SplitSeq(v, ",") {
		if h == "" {
			return nil, errors.New("master_list: empty host name")
		}
		if h != "*" && !validHostName(h) {
			return nil, fmt.Errorf("master_list: bad host name %q", h)
		}
		if slices.Contains(hosts, h) {
			return nil, fmt.Errorf("master_list: %s named twice", h)
		}
		hosts = append(hosts, h)
	}
	return hosts, nil
}

func validHostName(h string) bool {
	if h == "" || len(h) > 255 {
		return false
	}
	for _, r := range h {
		if !(r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r) || strings.ContainsRune("-_.", r))) {
			return false
		}
	}
	return true
}

// ValidName refuses a policy name OpenVMS would refuse.
func ValidName(n string) error {
	if n == "" || len(n) > maxPolicyName {
		return fmt.Errorf("%w: policy name %q: want 1 to %d characters", ErrPolicy, n, maxPolicyName)
	}
	for _, r := range n {
		if !(r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r) || r == '$' || r == '_')) {
			return fmt.Errorf("%w: policy name %q: letters, digits, $ and _ only", ErrPolicy, n)
		}
	}
	return nil
}

// MinicopyPolicy is `--policy minicopy[=optional]` on dismount and mount.
type MinicopyPolicy uint8

const (
	// NoMinicopy: no bitmap is kept (dismount) or required (mount).
	NoMinicopy MinicopyPolicy = iota
	// MinicopyRequired: without a bitmap the command fails.
	MinicopyRequired
	// MinicopyOptional: a bitmap if possible, else carry on without.
	MinicopyOptional
)

// ParseMinicopyPolicy reads "", "minicopy", "minicopy=optional" and
// "nominicopy".
func ParseMinicopyPolicy(s string) (MinicopyPolicy, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "nominicopy":
		return NoMinicopy, nil
	case "minicopy":
		return MinicopyRequired, nil
	case "minicopy=optional":
		return MinicopyOptional, nil
	}
	return 0, fmt.Errorf("%w: %q: want minicopy, minicopy=optional or nominicopy", ErrPolicy, s)
}

// Store holds the named HBMM policies (clusterwide in OpenVMS; this
// host's for now).
type Store struct {
	mu    sync.Mutex
	named map[string]HBMMPolicy
}

// Get finds a named policy (names are case-blind).
func (s *Store) Get(name string) (HBMMPolicy, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.named[strings.ToUpper(name)]
	return p, ok
}

// Define adds or replaces a named policy.
func (s *Store) Define(name string, p HBMMPolicy) error {
	name = strings.ToUpper(name)
	if err := ValidName(name); err != nil {
		return err
	}
	if name == PolicyNoDefault {
		return fmt.Errorf("%w: NODEFAULT is reserved: it means a set uses no HBMM", ErrPolicy)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.named == nil {
		s.named = map[string]HBMMPolicy{}
	}
	if _, ok := s.named[name]; !ok && len(s.named) >= MaxNamedPolicies {
		return fmt.Errorf("%w: already %d named policies", ErrPolicy, MaxNamedPolicies)
	}
	p.Name = name
	s.named[name] = p
	return nil
}

// Remove deletes a named policy.
func (s *Store) Remove(name string) error {
	name = strings.ToUpper(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.named[name]; !ok {
		return fmt.Errorf("%w: no policy named %s", ErrPolicy, name)
	}
	delete(s.named, name)
	return nil
}

// List returns the named policies by name.
func (s *Store) List() []HBMMPolicy {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]HBMMPolicy, 0, len(s.named))
	for _, p := range s.named {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
