package policy

import (
	"errors"
	"reflect"
	"slices"
	"testing"
)

func TestParseHBMMPolicy(t *testing.T) {
	good := map[string]HBMMPolicy{
		"hbmm=(master_list=(a,b),count=1,reset_threshold=50000)": {Lists: []MasterList{{Hosts: []string{"a", "b"}, Count: 1}}, ResetThreshold: 50000},
		"HBMM=(MASTER_LIST=*)":                      {Lists: []MasterList{{Hosts: []string{"*"}}}},
		"hbmm=(master_list=(a,b),write_policy=ALL)": {Lists: []MasterList{{Hosts: []string{"a", "b"}}}, WritePolicy: WriteAll},
		"hbmm=( master_list=(a), count=1, master_list=(c,d), count=2 )": {Lists: []MasterList{
			{Hosts: []string{"a"}, Count: 1}, {Hosts: []string{"c", "d"}, Count: 2}}},
	}
	for in, want := range good {
		ref, err := ParseHBMMPolicy(in)
		if err != nil || ref.Policy == nil || !reflect.DeepEqual(*ref.Policy, want) {
			t.Errorf("%q: %+v %v, want %+v", in, ref.Policy, err, want)
		}
	}
	if ref, err := ParseHBMMPolicy("hbmm=nodefault"); err != nil || ref.Name != PolicyNoDefault {
		t.Errorf("hbmm=nodefault: %+v %v", ref, err)
	}
	for _, in := range []string{"", "hbmm", "hbmm=", "hbmm=()", "hbmm=(count=1)", "hbmm=(master_list=(a),count=0)",
		"hbmm=(master_list=(a),count=7)", "hbmm=(master_list=(a,a))", "hbmm=(master_list=(a)", "hbmm=(master_list=((a)))",
		"hbmm=(reset_threshold=-1,master_list=(a))", "hbmm=(master_list=(a),bogus=1)", "hbmm=(master_list=(a),count=1,count=2)",
		"minicopy", "hbmm=bad-name!", "hbmm=(master_list=(a b))", "hbmm=(master_list=(a),write_policy=some)",
		"hbmm=(master_list=(a),write_policy=all,write_policy=all)"} {
		if _, err := ParseHBMMPolicy(in); !errors.Is(err, ErrPolicy) {
			t.Errorf("%q: %v, want ErrPolicy", in, err)
		}
	}
}

func TestMasters(t *testing.T) {
	p := HBMMPolicy{Lists: []MasterList{{Hosts: []string{"a", "b", "c"}, Count: 2}, {Hosts: []string{"*"}, Count: 1}}}
	if got := p.Masters([]string{"c", "d", "b", "a"}); !slices.Equal(got, []string{"c", "b", "d"}) {
		t.Fatalf("masters %v", got)
	}
	if got := p.Masters(nil); len(got) != 0 {
		t.Fatalf("masters of nobody: %v", got)
	}
}

// FuzzParseHBMMPolicy: any input is refused with ErrPolicy, or parses to
// a policy whose rendering parses back to the same policy.
func FuzzParseHBMMPolicy(f *testing.F) {
	for _, s := range []string{"hbmm=(master_list=(a,b),count=1,reset_threshold=50000)", "hbmm=DEFAULT", "hbmm=(master_list=*)",
		"hbmm=(master_list=(a),count=1,master_list=(b),count=1)", "hbmm=((", "hbmm=(master_list=(a),count=1,count=2)"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ref, err := ParseHBMMPolicy(s)
		if err != nil {
			if !errors.Is(err, ErrPolicy) {
				t.Fatalf("%q: error %v does not wrap ErrPolicy", s, err)
			}
			return
		}
		if ref.Policy == nil {
			if ValidName(ref.Name) != nil {
				t.Fatalf("%q: accepted bad name %q", s, ref.Name)
			}
			return
		}
		again, err := ParseHBMMPolicy(ref.Policy.String())
		if err != nil || again.Policy == nil || !reflect.DeepEqual(*again.Policy, *ref.Policy) {
			t.Fatalf("%q -> %q -> %+v %v", s, ref.Policy.String(), again.Policy, err)
		}
	})
}

func TestParseMinicopyPolicy(t *testing.T) {
	for in, want := range map[string]MinicopyPolicy{"": NoMinicopy, "MINICOPY": MinicopyRequired, "minicopy=optional": MinicopyOptional, "nominicopy": NoMinicopy} {
		if got, err := ParseMinicopyPolicy(in); err != nil || got != want {
			t.Errorf("%q: %v %v", in, got, err)
		}
	}
	if _, err := ParseMinicopyPolicy("minicopy=maybe"); !errors.Is(err, ErrPolicy) {
		t.Errorf("minicopy=maybe: %v", err)
	}
}
