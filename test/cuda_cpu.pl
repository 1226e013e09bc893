#!/usr/bin/perl
# cuda_cpu.pl IN OUT — copies a .cu file for the CUDA-on-CPU build (test/cuda_cpu.h), rewriting the
# three constructs C++ cannot express. Every line stays where it was, and a #line directive names the
# original file, so warnings, reports and gdb point at the real source.
#   K<<<grid, block[, smem[, stream]]>>>(args)  ->  cuda_cpu::launch(__FILE__, __LINE__, "K", K, grid, block...)(args)
#   __shared__ T a[N], b[M];                    ->  static T a[N], b[M]; cuda_cpu_shared(a); cuda_cpu_shared(b);
#   extern __shared__ T a[];                    ->  T* a = (T*)cuda_cpu::dynamic_shared();
#   __launch_bounds__(n) f(...) {               ->  f(...) { cuda_cpu::launch_bounds(__FILE__, __LINE__, n);
use strict;
use warnings;
my ($in, $out) = @ARGV;
die "usage: cuda_cpu.pl IN.cu OUT.cu\n" unless defined $out;
open(my $fh, '<', $in) or die "$in: $!\n";
local $/;
my $s = <$fh>;
close $fh;

my $paren = qr/(\((?:[^()]++|(?-1))*\))/;  # balanced parentheses

# String literals and comments are set aside first (they may mention __shared__ or <<<).
my @kept;
$s =~ s{("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|//[^\n]*|/\*.*?\*/)}{push @kept, $1; "\x01$#kept\x02"}gse;

# __launch_bounds__(...) before a kernel's name: the check goes first in its body
$s =~ s{__launch_bounds__\s*$paren(.*?)\{}{
    my ($args, $mid) = (substr($1, 1, -1), $2);
    $mid . chr(123) . " cuda_cpu::launch_bounds(__FILE__, __LINE__, $args);"
}gse;

# dynamic shared memory
$s =~ s{extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;}{$1* $2 = ($1*)cuda_cpu::dynamic_shared();}g;

# static shared arrays: static storage, registered (and NaN-filled) when a block reaches them
$s =~ s{__shared__\s+([^;]*);}{
    my $decl = $1;
    my @names = ($decl =~ /(\w+)\s*(?:\[[^\]]*\]\s*)+(?=,|$)/g);
    push @names, $1 if !@names && $decl =~ /(\w+)\s*$/;
    "static $decl;" . join('', map { " cuda_cpu_shared($_);" } @names)
}ge;

# kernel launches
$s =~ s{\b([A-Za-z_]\w*(?:\s*<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(}{
    my ($k, $cfg) = ($1, $2);
    (my $name = $k) =~ s/\s+/ /g;
    "cuda_cpu::launch(__FILE__, __LINE__, \"$name\", $k, $cfg)("
}gse;

die "$in: a kernel launch cuda_cpu.pl could not rewrite is left\n" if $s =~ /<<<|>>>/;
die "$in: a __shared__ or __launch_bounds__ cuda_cpu.pl could not rewrite is left\n" if $s =~ /__shared__|__launch_bounds__/;

$s =~ s{\x01(\d+)\x02}{$kept[$1]}g;

open(my $oh, '>', "$out.tmp") or die "$out.tmp: $!\n";
print $oh "#line 1 \"$in\"\n$s";
close $oh or die "$out.tmp: $!\n";
rename("$out.tmp", $out) or die "$out: $!\n";
